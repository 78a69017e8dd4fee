"""The project's import graph, read with `ast` (nothing is imported): no circles, the
library below the job layer, project imports at the top of their modules.

Modules: every `.py` file of `dreamlite_jax`, `data_pipelines` and `converters` (the
library and the job layer), and of `benchmarks` and `experiments` (importers only: their
imports are edges of the graph, they are neither library nor job layer). An edge is an
`import a.b` / `from a.b import c` of a project module, resolved to `a.b.c` when `c` is a
module and to the longest project module prefix otherwise (relative imports included). A
package's `__init__` is an edge only when the package itself is imported.

Rules:
- no circle among module-level imports;
- a library module imports neither the job layer (the `dreamlite_jax.job` package and
  `JOB_LAYER`, the command line) nor `experiments`,
  at module or function level;
- no function-level import of a project module outside `LAZY_IMPORTS` (each with its one-line
  reason: a module that pulls TensorFlow or torch, or the job runner's lazy stage registry).
  Third-party imports (tensorflow, torch, transformers, diffusers, ...) are out of scope;
- every allow-list entry still matches an import, so the lists only shrink.
"""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED_PACKAGES = ("dreamlite_jax", "data_pipelines", "converters")
IMPORTER_PACKAGES = ("benchmarks", "experiments")

# The job layer: the runner, its stage context and records, the stage runners.
JOB_LAYER = frozenset({"dreamlite_jax.main"})
JOB_PACKAGE = "dreamlite_jax.job"

# Function-level imports of project modules that stay lazy: (importer, imported) -> reason.
LAZY_IMPORTS = {
    ("dreamlite_jax.job.convert_stage", "converters.export"):
        "converters.export pulls TensorFlow (jax2tf, TFLiteConverter)",
    ("dreamlite_jax.job.stages", "dreamlite_jax.job.vae_stage"):
        "lazy stage-runner registry: a job imports only the runners of the kinds it runs",
    ("dreamlite_jax.job.stages", "dreamlite_jax.job.pretrain_stage"):
        "lazy stage-runner registry: a job imports only the runners of the kinds it runs",
    ("dreamlite_jax.job.stages", "dreamlite_jax.job.rl_stage"):
        "lazy stage-runner registry: a job imports only the runners of the kinds it runs",
    ("dreamlite_jax.job.stages", "dreamlite_jax.job.distill_stage"):
        "lazy stage-runner registry: a job imports only the runners of the kinds it runs",
    ("dreamlite_jax.job.stages", "dreamlite_jax.job.eval_stage"):
        "lazy stage-runner registry: a job imports only the runners of the kinds it runs",
    ("dreamlite_jax.job.stages", "dreamlite_jax.job.convert_stage"):
        "lazy stage-runner registry; convert_stage's export pulls TensorFlow",
}




@dataclasses.dataclass(frozen=True)
class Edge:
  importer: str
  imported: str
  line: int
  function_level: bool

  def where(self) -> str:
    return f"{self.importer} -> {self.imported} (line {self.line})"


def _modules() -> dict[str, tuple[Path, bool]]:
  """Dotted module name -> (file, is_package) for every parsed file."""
  modules = {}
  for package in CHECKED_PACKAGES + IMPORTER_PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
      parts = list(path.relative_to(ROOT).with_suffix("").parts)
      is_package = parts[-1] == "__init__"
      if is_package:
        parts = parts[:-1]
      modules[".".join(parts)] = (path, is_package)
  return modules


MODULES = _modules()


def _project_module(name: str) -> str | None:
  """The longest prefix of `name` that is a project module, or None (third party)."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
  if isinstance(node, ast.Import):
    return [t for t in (_project_module(a.name) for a in node.names) if t]
  if node.level:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    source = ".".join(base + ([node.module] if node.module else []))
  else:
    source = node.module or ""
  targets = []
  for alias in node.names:
    full = f"{source}.{alias.name}"
    target = full if full in MODULES else _project_module(source)
    if target:
      targets.append(target)
  return targets


def _edges() -> list[Edge]:
  edges = []
  for module, (path, is_package) in MODULES.items():
    tree = ast.parse(path.read_text(), filename=str(path))

    def visit(node: ast.AST, in_function: bool) -> None:
      for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
          for target in dict.fromkeys(_targets(module, is_package, child)):
            if target != module:
              edges.append(Edge(module, target, child.lineno, in_function))
        visit(child, in_function or isinstance(
            child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
  return edges


EDGES = _edges()


def is_job_layer(module: str) -> bool:
  return module in JOB_LAYER or module == JOB_PACKAGE or module.startswith(JOB_PACKAGE + ".")


def is_library(module: str) -> bool:
  return module.split(".")[0] in CHECKED_PACKAGES and not is_job_layer(module)


def _cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], set[str]]]:
  """(one shortest circle a -> ... -> a, all its modules) per strongly connected component
  of more than one module (Tarjan)."""
  index, low, on_stack, stack, components = {}, {}, set(), [], []

  def connect(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        connect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.add(w)
        if w == v:
          break
      if len(component) > 1:
        components.append(component)

  for v in sorted(graph):
    if v not in index:
      connect(v)
  cycles = []
  for component in components:
    start = min(component)
    paths, seen = [[start]], {start}
    while paths:  # shortest way back to `start` inside the component
      path = paths.pop(0)
      nxt = sorted(graph[path[-1]] & component)
      if start in nxt:
        cycles.append((path + [start], component))
        break
      for w in nxt:
        if w not in seen:
          seen.add(w)
          paths.append(path + [w])
  return cycles


def test_graph_is_read():
  # Guards the rules below against passing on an empty or mis-resolved graph.
  assert len(MODULES) > 80
  edges = {(e.importer, e.imported) for e in EDGES}
  assert ("dreamlite_jax.main", "dreamlite_jax.job.stages") in edges
  assert ("dreamlite_jax.models.unet", "dreamlite_jax.models.layers") in edges


def test_no_import_cycles():
  graph: dict[str, set[str]] = {}
  for e in EDGES:
    if not e.function_level:
      graph.setdefault(e.importer, set()).add(e.imported)
  cycles = _cycles(graph)
  if cycles:
    pytest.fail("module-level import circles (one per knot; the knot's modules below it):\n"
                + "\n".join(f"  {' -> '.join(c)}\n    knot: {', '.join(sorted(k))}"
                             for c, k in cycles))


def test_library_does_not_import_job_layer_or_experiments():
  bad = [e for e in EDGES
         if is_library(e.importer)
         and (is_job_layer(e.imported) or e.imported.split(".")[0] == "experiments")]
  if bad:
    pytest.fail("library modules importing the job layer or experiments/ (move the shared "
                "code into the library):\n" + "\n".join("  " + e.where() for e in bad))


def test_project_imports_are_at_module_level():
  bad = [e for e in EDGES if e.function_level and (e.importer, e.imported) not in LAZY_IMPORTS]
  if bad:
    pytest.fail("function-level imports of project modules (move them to the top of the "
                "module, or add a lazy case to LAZY_IMPORTS with its reason):\n"
                + "\n".join("  " + e.where() for e in bad))


def test_allow_lists_name_existing_imports():
  function_level = {(e.importer, e.imported) for e in EDGES if e.function_level}
  stale = [f"LAZY_IMPORTS {k}" for k, reason in LAZY_IMPORTS.items()
           if k not in function_level]
  if stale:
    pytest.fail("allow-list entries that match no import (delete them):\n"
                + "\n".join("  " + s for s in stale))
