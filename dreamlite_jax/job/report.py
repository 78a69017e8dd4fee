"""The job's report: `report.md` for people, `scores.json` for machines, PNGs for both.

Rebuilt from the workdir alone (every finished stage's `DONE.json` record, as the
job runner reads them, and `metrics.jsonl`), so it is the same whether the job ran
in one go or resumed. The job runner calls it on process 0 only; the workdir may be
a URL (files are written through `etils.epath`).

`scores.json` (floats in [0, 1] unless noted; null where the stage did not run):
  t2i.{overall, heldout_overall, <category>..., heldout_<category>...}
  edit.{accuracy, heldout_accuracy, <type>..., heldout_<type>...}
  vae.{ceiling_t2i, ceiling_t2i_heldout, ceiling_edit, ceiling_edit_heldout}: the scores
    of VAE round-trips of ground truth, a bound on the t2i/edit numbers
  rl.{before, after}   distill.{teacher, teacher_naive_4step, teacher_naive_4step_cfg, student_4step}
  convert.{gpu_check_findings (int), max_abs_err_fp32}   wall_time_s (seconds)
  stages.<stage>.{steps, wall_time_s, final_loss}
The t2i/edit numbers are the `eval` stage's (else the last stage that scored).
"""
from __future__ import annotations

import io
import json
import math
import os
from typing import Any, Callable

import ml_collections
from etils import epath

from data_pipelines import shapes
from dreamlite_jax.training import metrics as metrics_lib

LOSS_PNG = "loss_curves.png"
# The `vae` stage's results that bound every later score (`vae_stage.ceilings`).
CEILINGS = ("ceiling_t2i", "ceiling_t2i_heldout", "ceiling_edit", "ceiling_edit_heldout")


def _final_scores(records: dict[str, dict]) -> dict | None:
  if "eval" in records:
    return records["eval"]["results"].get("scores")
  scored = [r["results"]["scores"] for r in records.values() if r["results"].get("scores")]
  return scored[-1] if scored else None


def build_scores(records: dict[str, dict]) -> dict[str, Any]:
  """The `scores.json` dict (see module docstring)."""
  scores = _final_scores(records) or {}
  t2i = {"overall": None, "heldout_overall": None, **scores.get("t2i", {})}
  edit = {"accuracy": None, "heldout_accuracy": None, **scores.get("edit", {})}
  rl = {"before": None, "after": None}
  distill = {"teacher": None, "teacher_naive_4step": None, "teacher_naive_4step_cfg": None,
             "student_4step": None}
  convert = {"gpu_check_findings": None, "max_abs_err_fp32": None}
  vae = {k: None for k in CEILINGS}
  for record in records.values():
    results = record["results"]
    vae.update({k: results[k] for k in CEILINGS if k in results})
    for key, target in (("rl", rl), ("distill", distill), ("convert", convert)):
      if isinstance(results.get(key), dict):
        target.update({k: v for k, v in results[key].items() if k in target or key == "rl"})
  stage_rows = {name: {"steps": r["results"].get("steps"), "wall_time_s": r["wall_time_s"],
                       "final_loss": r["results"].get("final_loss")}
                for name, r in records.items()}
  return {"t2i": t2i, "edit": edit, "vae": vae, "rl": {k: rl[k] for k in ("before", "after")},
          "distill": distill, "convert": convert,
          "wall_time_s": float(sum(r["wall_time_s"] for r in records.values())),
          "stages": stage_rows}


def _fmt(value: Any, digits: int = 3) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    if not math.isfinite(value):
      return str(value)
    return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
  return str(value)


def plot_losses(workdir: str, names: list[str], path: str) -> str | None:
  """One panel per stage with logged losses; returns the PNG path (None when no metrics)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  curves = {}
  for name in names:
    rows = [h for h in metrics_lib.read_metrics(os.path.join(workdir, name)) if "loss" in h]
    if rows:
      by_step = {int(h["step"]): h["loss"] for h in rows}  # a resumed run rewrites steps
      steps = sorted(by_step)
      curves[name] = (steps, [by_step[s] for s in steps])
  if not curves:
    return None
  fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 2.8), squeeze=False)
  for ax, (name, (steps, losses)) in zip(axes[0], curves.items()):
    ax.plot(steps, losses, lw=1)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    if min(losses) > 0:
      ax.set_yscale("log")
  axes[0][0].set_ylabel("loss", fontsize=8)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=110)
  plt.close(fig)
  epath.Path(path).write_bytes(png.getvalue())
  return path


def _score_table(records: dict[str, dict]) -> list[str]:
  rows = [(n, r["results"]["scores"]) for n, r in records.items() if r["results"].get("scores")]
  if not rows:
    return ["No stage has shapes scores yet."]
  lines = []
  for task, first, keys in (("t2i", ("overall", "heldout_overall"), shapes.T2I_CATEGORIES),
                            ("edit", ("accuracy", "heldout_accuracy"), shapes.EDIT_TYPES)):
    heldout = [f"heldout_{k}" for k in keys]
    cols = list(first) + list(keys) + heldout
    cols = [c for c in cols if any(c in s.get(task, {}) for _, s in rows)]
    lines += [f"**{task.upper()}** (held-in categories, then held-out `heldout_*`)", "",
              "| stage | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, s in rows:
      lines.append(f"| {name} | " + " | ".join(_fmt(s.get(task, {}).get(c), 2) for c in cols) + " |")
    lines.append("")
  return lines


def render_markdown(config: ml_collections.ConfigDict, workdir: str, records: dict[str, dict],
                    scores: dict, loss_png: str | None) -> str:
  lines = ["# DreamLite-JAX job report", "",
           f"Workdir `{workdir}`; preset `{config.get('preset', 'default')}`; stages "
           f"`{config.stages}`; total wall time {scores['wall_time_s']:.0f} s.", "",
           "## Stages", "", "| stage | steps | wall time (s) | final loss | finished |",
           "|---|---|---|---|---|"]
  for name, r in records.items():
    res = r["results"]
    lines.append(f"| {name} | {_fmt(res.get('steps'))} | {r['wall_time_s']:.0f} | "
                 f"{_fmt(res.get('final_loss'), 4)} | {r['finished_at']} |")
  missing = [n for n in config.stages.split(",") if n.strip() and n.strip() not in records]
  if missing:
    lines += ["", f"Not finished: {', '.join(missing)}."]
  lines += ["", "## Headline scores", "",
            f"- T2I overall {_fmt(scores['t2i']['overall'])}, held-out "
            f"{_fmt(scores['t2i']['heldout_overall'])}",
            f"- Edit accuracy {_fmt(scores['edit']['accuracy'])}, held-out "
            f"{_fmt(scores['edit']['heldout_accuracy'])}",
            f"- Ceilings (the scores of VAE round-trips of ground truth): T2I "
            f"{_fmt(scores['vae']['ceiling_t2i'])} (held-out "
            f"{_fmt(scores['vae']['ceiling_t2i_heldout'])}), edit "
            f"{_fmt(scores['vae']['ceiling_edit'])} (held-out "
            f"{_fmt(scores['vae']['ceiling_edit_heldout'])})",
            f"- RL reward before {_fmt(scores['rl']['before'])} -> after {_fmt(scores['rl']['after'])}",
            f"- Distillation: teacher {_fmt(scores['distill']['teacher'])}, teacher at 4 steps "
            f"without CFG {_fmt(scores['distill']['teacher_naive_4step'])} (with CFG "
            f"{_fmt(scores['distill']['teacher_naive_4step_cfg'])}), 4-step student "
            f"{_fmt(scores['distill']['student_4step'])}",
            "", "## Shapes scores after each stage", ""]
  lines += _score_table(records)
  if loss_png:
    lines += ["## Loss curves", "", f"![loss curves]({os.path.basename(loss_png)})", ""]
  lines += ["## Samples", ""]
  for name, r in records.items():
    for grid in r["results"].get("sample_grids", []):
      lines.append(f"**{name}: {grid}**\n\n![{name} {grid}]({name}/{grid})\n")
  conv = next((r["results"]["convert"] for r in records.values()
               if isinstance(r["results"].get("convert"), dict)), None)
  if conv:
    lines += ["## Exported TFLite files", "",
              f"Precision {conv.get('precision')}; every file passed `gpu_check` (findings: "
              f"{conv.get('gpu_check_findings')}) and the numerics gate.", "",
              "| model | file | MiB | gpu_check findings | max abs err | max rel err | min PSNR (dB) |",
              "|---|---|---|---|---|---|---|"]
    for f in conv.get("files", []):
      lines.append(f"| {f['name']} | `{f['file']}` | {f['bytes'] / 2 ** 20:.2f} | "
                   f"{f['gpu_check_findings']} | {_fmt(f['max_abs_err'])} | "
                   f"{_fmt(f['max_rel_err'])} | {_fmt(f['min_psnr_db'], 1)} |")
    lines.append("")
  lines += ["Machine-readable numbers: `scores.json`.", ""]
  return "\n".join(lines)


def write_report(config: ml_collections.ConfigDict, workdir: str, records: dict[str, dict],
                 log: Callable[[str], None] = print) -> dict:
  """Writes `report.md`, `scores.json` and `loss_curves.png` into `workdir`; returns the scores.

  `records`: {stage: DONE record} of the finished stages of `config.stages`, in order
  (`stages.finished_records`).
  """
  scores = build_scores(records)
  loss_png = plot_losses(workdir, list(records), os.path.join(workdir, LOSS_PNG))
  epath.Path(workdir, "scores.json").write_text(json.dumps(scores, indent=2, sort_keys=True))
  epath.Path(workdir, "report.md").write_text(
      render_markdown(config, workdir, records, scores, loss_png))
  log(f"[job] report: {os.path.join(workdir, 'report.md')}")
  return scores
