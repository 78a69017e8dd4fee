"""Evaluation report: `scores.json`, a bar chart of every score and `report.md` linking the PNGs.

Scores may be flat ({name: value}) or nested one level ({"t2i": {name: value}, ...});
the chart shows every numeric score, named `group/name` when nested.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def flatten(scores: dict[str, Any], prefix: str = "") -> dict[str, float]:
  """{"t2i": {"overall": 0.5}} -> {"t2i/overall": 0.5}; non-numeric leaves are dropped."""
  out: dict[str, float] = {}
  for k, v in scores.items():
    name = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, name + "/"))
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      out[name] = float(v)
  return out


def bar_chart(scores: dict[str, Any], path: str, title: str = "scores") -> str:
  """PNG bar chart of the flattened numeric scores (one horizontal bar each)."""
  flat = flatten(scores)
  if not flat:
    raise ValueError(f"bar_chart: no numeric scores to plot in {sorted(scores)}")
  names = list(flat)
  fig, ax = plt.subplots(figsize=(7, 0.3 * len(names) + 1.2))
  ax.barh(range(len(names)), [flat[n] for n in names], color="tab:blue")
  ax.set_yticks(range(len(names)), names, fontsize=8)
  ax.invert_yaxis()
  ax.set_xlim(0, max(1.0, max(flat.values())))
  ax.set_title(title)
  for i, n in enumerate(names):
    ax.text(flat[n], i, f" {flat[n]:.3f}", va="center", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write_report(outdir: str, scores: dict[str, Any], title: str,
                 grids: Sequence[str] = (), details: dict[str, Any] | None = None) -> dict[str, str]:
  """Writes `scores.json`, `scores.png` and `report.md` under `outdir`.

  `grids` are PNG paths (inside `outdir`) embedded in the report; `details`
  (e.g. the sampler settings) is listed under the scores table.
  Returns {"scores", "chart", "report"} paths.
  """
  os.makedirs(outdir, exist_ok=True)
  scores_path = os.path.join(outdir, "scores.json")
  with open(scores_path, "w", encoding="utf-8") as f:
    json.dump(scores, f, indent=2, sort_keys=True)
  chart = bar_chart(scores, os.path.join(outdir, "scores.png"), title)
  lines = [f"# {title}", "", "| score | value |", "|---|---|"]
  lines += [f"| {k} | {v:.4f} |" for k, v in flatten(scores).items()]
  if details:
    lines += ["", "## Settings", ""] + [f"- {k}: {v}" for k, v in details.items()]
  lines += ["", "![scores](scores.png)"]
  if grids:
    lines += ["", "## Samples", ""]
    for g in grids:
      rel = os.path.relpath(g, outdir)
      lines += [f"### {os.path.splitext(os.path.basename(g))[0]}", "", f"![{rel}]({rel})", ""]
  report = os.path.join(outdir, "report.md")
  with open(report, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return {"scores": scores_path, "chart": chart, "report": report}
