"""The user docs against the code, so they cannot drift apart.

For README.md, converters/README.md and docs/*.md:
- every `python -m MODULE` names a module whose `--help` exits 0 and prints argparse usage
  (run as a subprocess, once per module), and every `--option` a command passes to it is one
  its `--help` lists (`--config.a.b=v` overrides excepted; for a module with sub-commands,
  such as `dreamlite_jax.pipeline generate`, the sub-command's `--help`);
- every repository path they mention (`experiments/x.py`, `docs/y.md`, `dreamlite_jax/...`;
  `<name>` placeholders and `*` match at least one file, `{a,b}` expands to each) exists,
  and every relative markdown link resolves from the file that holds it (a `#anchor` to a
  heading of the target file);
- every dotted name they give for a project object (`dreamlite_jax.pipeline.load_pipeline`),
  and every name their ```python examples import, resolves.

Commands are read from fenced code blocks (backslash continuations joined, `#` comments
dropped) and from inline code spans; `&&`, `;` and `|` separate commands.
"""
from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", ROOT / "converters" / "README.md",
             *sorted((ROOT / "docs").glob("*.md"))]
# Top-level folders of this repository: a mention that starts with one is a repo path.
REPO_DIRS = ("dreamlite_jax", "data_pipelines", "converters", "experiments", "benchmarks",
             "tests", "docs", ".ci")
PACKAGES = ("dreamlite_jax", "data_pipelines", "converters", "benchmarks", "experiments")
# A guard against hangs only: `--help` of a module that imports TensorFlow takes ~5 s on an
# idle 2-core machine, several times that when the machine is busy.
HELP_TIMEOUT_S = 120

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
_INLINE = re.compile(r"`([^`]+)`")
_PYTHON_M = re.compile(r"(?<![\w/.-])python3? -m ([A-Za-z_][\w.]*)")
_SEPARATORS = re.compile(r"&&|\|\||;|\|")
_PATH = re.compile(r"(?<![\w./~$:-])((?:%s)/[^\s`'\"()\[\],;:|#]*)"
                   % "|".join(re.escape(d) for d in REPO_DIRS))
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_DOTTED = re.compile(r"^((?:%s)(?:\.[A-Za-z_]\w*)+)" % "|".join(PACKAGES))


def _read(doc: Path) -> str:
  return doc.read_text(encoding="utf-8")


def _code_snippets(text: str) -> list[str]:
  """Fenced-block lines (continuations joined, comments dropped) and inline code spans."""
  snippets = []
  for block in _FENCE.findall(text):
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
      snippets.append(re.sub(r"(^|\s)#.*$", "", line))
  prose = _FENCE.sub("", text)
  snippets += [span.replace("\n", " ") for span in _INLINE.findall(prose)]
  return snippets


@functools.lru_cache(maxsize=None)
def _commands(doc: Path) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """(module, argument tokens) of every `python -m` command in the doc's code."""
  out = []
  for snippet in _code_snippets(_read(doc)):
    for segment in _SEPARATORS.split(snippet):
      match = re.search(r"(?<![\w/.-])python3? -m ([A-Za-z_][\w.]*)(.*)$", segment)
      if match:
        tokens = tuple(t.strip("\"'") for t in match.group(2).split())
        out.append((match.group(1).rstrip("."), tuple(t for t in tokens if t)))
  return tuple(out)


def _all_modules() -> list[str]:
  """Every module named after `python -m` anywhere in the docs, code or prose."""
  names = set()
  for doc in DOC_FILES:
    names.update(m.rstrip(".") for m in _PYTHON_M.findall(_read(doc).replace("\n", " ")))
    names.update(module for module, _ in _commands(doc))
  return sorted(names)


def _subcommands(help_text: str) -> set[str]:
  """Sub-command names argparse lists in a usage line as `{a,b}`."""
  return {name for group in re.findall(r"\{([\w,-]+)\}", help_text) for name in group.split(",")}


def _help_argv(module: str, args: tuple[str, ...], helps: dict) -> tuple[str, ...]:
  """The `--help` invocation whose options `args` must come from (module or sub-command)."""
  first = next((a for a in args if not a.startswith("-")), None)
  if args and first == args[0] and first in _subcommands(helps[(module,)]["stdout"]):
    return (module, first)
  return (module,)


def _repo_source(module: str) -> Path | None:
  """The file `python -m module` runs, when the module is part of this repository."""
  base = ROOT.joinpath(*module.split("."))
  for path in (base.with_suffix(".py"), base / "__main__.py"):
    if path.is_file():
      return path
  return None


def _run_help(argv: tuple[str, ...]) -> dict:
  source = _repo_source(argv[0]) if len(argv) == 1 else None
  if source is not None and not re.search(r"argparse|absl|sys\.argv", source.read_text("utf-8")):
    # Without a parser `--help` would start the module's work (minutes for a benchmark).
    return {"rc": None, "stdout": "", "stderr": f"{source.relative_to(ROOT)} does not parse its "
                                                 f"arguments (no argparse), so `--help` would run it"}
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
  try:
    proc = subprocess.run([sys.executable, "-m", *argv, "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=HELP_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    return {"rc": None, "stdout": "", "stderr": f"--help still running after {HELP_TIMEOUT_S} s "
                                                f"(does the module parse its arguments, or did it start its work?)"}
  return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


@pytest.fixture(scope="module")
def helps() -> dict:
  """`--help` of every module (and every sub-command the docs use), run in parallel, cached."""
  modules = _all_modules()
  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    results = dict(zip([(m,) for m in modules], pool.map(_run_help, [(m,) for m in modules])))
    extra = {_help_argv(module, args, results) for doc in DOC_FILES
             for module, args in _commands(doc) if results[(module,)]["rc"] == 0}
    extra -= set(results)
    results.update(zip(extra, pool.map(_run_help, extra)))
  return results


def test_docs_exist():
  for doc in DOC_FILES:
    assert doc.is_file(), f"{doc.relative_to(ROOT)} is missing"
  assert (ROOT / "docs").is_dir() and len(DOC_FILES) > 2, "docs/*.md is missing"
  assert _all_modules(), "no `python -m` command found in the docs: the parser is broken"


@pytest.mark.parametrize("module", _all_modules())
def test_module_help(module, helps):
  result = helps[(module,)]
  where = [d.relative_to(ROOT).as_posix() for d in DOC_FILES if module in _read(d)]
  assert result["rc"] == 0, (
      f"`python -m {module} --help` (named in {where}) failed with rc {result['rc']}:\n"
      f"{result['stderr'][-2000:]}")
  assert "usage:" in result["stdout"].lower(), (
      f"`python -m {module} --help` (named in {where}) printed no usage: the module does not "
      f"parse its arguments, so a documented option could be silently ignored")


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda d: d.relative_to(ROOT).as_posix())
def test_command_options_exist(doc, helps):
  problems = []
  for module, args in _commands(doc):
    if helps[(module,)]["rc"] != 0:
      continue  # reported by test_module_help
    argv = _help_argv(module, args, helps)
    help_text = helps[argv]["stdout"]
    for token in args:
      if not token.startswith("--") or token == "--":
        continue
      name = token.split("=", 1)[0]
      if "." in name:  # --config.a.b=v: a config override, checked by the config loader
        continue
      if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", help_text):
        problems.append(f"python -m {' '.join(argv)}: no option {name} in its --help")
  assert not problems, f"{doc.relative_to(ROOT)}:\n" + "\n".join(problems)


def _expand_braces(path: str) -> list[str]:
  match = re.search(r"\{([^{}]*)\}", path)
  if not match:
    return [path]
  return [p for choice in match.group(1).split(",")
          for p in _expand_braces(path[:match.start()] + choice + path[match.end():])]


def _missing_paths(doc: Path) -> list[str]:
  text = _read(doc)
  missing = []
  for raw in sorted(set(_PATH.findall(text))):
    path = raw.rstrip(".")
    for candidate in _expand_braces(path):
      pattern = re.sub(r"<[^<>]*>", "*", candidate)
      if "*" in pattern:
        if not list(ROOT.glob(pattern.rstrip("/"))):
          missing.append(f"{raw} (no file matches {pattern})")
      elif not (ROOT / candidate).exists():
        missing.append(raw)
  for target in sorted(set(_LINK.findall(text))):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
      continue  # a URL or an anchor in the same file
    path, _, anchor = target.partition("#")
    linked = (doc.parent / path).resolve()
    if not linked.exists():
      missing.append(f"link {target}")
    elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
      missing.append(f"link {target} (no heading with that anchor in {path})")
  return missing


def _anchors(doc: Path) -> set[str]:
  """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
  headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", _FENCE.sub("", _read(doc)), re.M)
  return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda d: d.relative_to(ROOT).as_posix())
def test_repo_paths_exist(doc):
  missing = _missing_paths(doc)
  assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist:\n" + "\n".join(missing)


_PY_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def _dotted_names() -> dict[str, list[str]]:
  """Project names in inline code (`dreamlite_jax.pipeline.load_pipeline`) and the names
  the ```python examples import (`from dreamlite_jax.pipeline import load_pipeline`)."""
  names: dict[str, list[str]] = {}
  for doc in DOC_FILES:
    text, where = _read(doc), doc.relative_to(ROOT).as_posix()
    for span in _INLINE.findall(_FENCE.sub("", text)):
      match = _DOTTED.match(span.strip())
      if match and not span.strip().startswith(("python ", "python3 ")):
        names.setdefault(match.group(1), []).append(where)
    for block in _PY_FENCE.findall(text):
      for module, imported in re.findall(r"^from ([\w.]+) import ([\w, ]+)$", block, re.M):
        for name in imported.split(","):
          names.setdefault(f"{module}.{name.strip()}", []).append(where)
      for module in re.findall(r"^import ([\w.]+)$", block, re.M):
        names.setdefault(module, []).append(where)
  return names


_RESOLVE = r"""
import importlib, json, sys
bad = {}
for name in json.loads(sys.argv[1]):
  parts = name.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ModuleNotFoundError:
      continue
    except Exception as e:
      bad[name] = f"import {'.'.join(parts[:i])}: {type(e).__name__}: {e}"
      break
    try:
      for attr in parts[i:]:
        obj = getattr(obj, attr)
    except AttributeError as e:
      bad[name] = str(e)
    break
  else:
    bad[name] = "no importable module"
print(json.dumps(bad))
"""


def test_dotted_names_resolve():
  names = _dotted_names()
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, "-c", _RESOLVE, json.dumps(sorted(names))], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=HELP_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-2000:]
  bad = json.loads(proc.stdout.strip().splitlines()[-1])
  assert not bad, "\n".join(f"{n} (in {names[n]}): {why}" for n, why in sorted(bad.items()))
