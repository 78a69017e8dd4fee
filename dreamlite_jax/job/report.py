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
  learning_curve: [{stage, unet_steps, t2i, edit, sampler}...] (see `learning_curve`)
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
LEARNING_CURVE_PNG = "learning_curve.png"
# The stage kinds that update the U-Net: their steps make the learning curve's x axis.
UNET_KINDS = ("pretrain", "rl", "distill")
# The `vae` stage's results that bound every later score (`vae_stage.ceilings`).
CEILINGS = ("ceiling_t2i", "ceiling_t2i_heldout", "ceiling_edit", "ceiling_edit_heldout")


def _final_scores(records: dict[str, dict]) -> dict | None:
  if "eval" in records:
    return records["eval"]["results"].get("scores")
  scored = [r["results"]["scores"] for r in records.values() if r["results"].get("scores")]
  return scored[-1] if scored else None


def learning_curve(config: ml_collections.ConfigDict, workdir: str,
                   records: dict[str, dict]) -> list[dict[str, Any]]:
  """T2I and edit scores against the U-Net updates made so far, across the stages.

  A point per scored stage end (its record's `scores`), plus the points a pretrain
  stage logged every `eval.stage_check.every` steps (`check_t2i`, `check_edit` in its
  `metrics.jsonl`). `sampler` says what sampled them: "teacher" for the stage checks and
  RL's evaluation (many steps with CFG), "student" for the distilled 4-step sampler.
  """
  points, done = [], 0
  for name, record in records.items():
    kind = config[name].get("kind") if name in config else None
    results = record["results"]
    steps = int(results.get("steps") or 0) if kind in UNET_KINDS else 0
    if kind == "pretrain":
      by_step = {int(h["step"]): h for h in metrics_lib.read_metrics(os.path.join(workdir, name))
                 if "check_t2i" in h}
      points += [{"stage": name, "unet_steps": done + s, "t2i": h["check_t2i"],
                  "edit": h["check_edit"], "sampler": "teacher"}
                 for s, h in sorted(by_step.items()) if s < steps]
    done += steps
    scores = results.get("scores")
    if scores and "t2i" in scores:
      points.append({"stage": name, "unet_steps": done, "t2i": scores["t2i"].get("overall"),
                     "edit": scores.get("edit", {}).get("accuracy"),
                     "sampler": "student" if kind in ("distill", "eval") else "teacher"})
  return points


def _save_figure(fig, path: str) -> str:
  """Writes a matplotlib figure as a PNG to `path` (a URL too) and closes it."""
  import matplotlib.pyplot as plt

  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=110)
  plt.close(fig)
  epath.Path(path).write_bytes(png.getvalue())
  return path


def plot_learning_curve(points: list[dict], ceilings: dict, path: str) -> str | None:
  """T2I and edit score against U-Net steps (one PNG), stage ends marked, the VAE
  ceilings dashed; returns the path (None without points)."""
  if not points:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8.5, 3.6))
  for task, colour, ceiling in (("t2i", "tab:blue", "ceiling_t2i"),
                                ("edit", "tab:orange", "ceiling_edit")):
    for sampler, marker, style in (("teacher", "o", "-"), ("student", "*", "")):
      xy = [(p["unet_steps"], p[task]) for p in points
            if p["sampler"] == sampler and p[task] is not None]
      if xy:
        ax.plot(*zip(*xy), style, marker=marker, color=colour, ms=8 if marker == "*" else 4,
                lw=1, label=f"{task.upper()} ({sampler} sampler)")
    if ceilings.get(ceiling) is not None:
      ax.axhline(ceilings[ceiling], color=colour, ls="--", lw=0.8,
                 label=f"{task.upper()} VAE ceiling")
  ends: dict[int, list[str]] = {}  # stage ends at the same update count share a label
  for p in points:
    names = ends.setdefault(max(q["unet_steps"] for q in points if q["stage"] == p["stage"]), [])
    if p["stage"] not in names:
      names.append(p["stage"])
  for x, names in ends.items():
    ax.axvline(x, color="0.8", lw=0.6, zorder=0)
    ax.text(x, 1.02, ", ".join(names), rotation=30, fontsize=7, ha="left", va="bottom",
            transform=ax.get_xaxis_transform())
  ax.set_xlabel("U-Net updates", fontsize=8)
  ax.set_ylabel("shapes score", fontsize=8)
  ax.set_xlim(0, max(ends) * 1.03)
  ax.set_ylim(0, 1.05)
  ax.tick_params(labelsize=7)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  return _save_figure(fig, path)


def build_scores(records: dict[str, dict]) -> dict[str, Any]:
  """The `scores.json` dict (see module docstring), less the learning curve."""
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
  return _save_figure(fig, path)


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
                    scores: dict, loss_png: str | None, curve_png: str | None = None) -> str:
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
            f"- RL before {_fmt(scores['rl']['before'])} -> after {_fmt(scores['rl']['after'])} "
            f"(T2I overall with RL's evaluation sampler; on embedding caches the mean reward)",
            f"- Distillation, T2I and edit averaged (T2I alone without edits): teacher "
            f"{_fmt(scores['distill']['teacher'])}, teacher at 4 steps "
            f"without CFG {_fmt(scores['distill']['teacher_naive_4step'])} (with CFG "
            f"{_fmt(scores['distill']['teacher_naive_4step_cfg'])}), 4-step student "
            f"{_fmt(scores['distill']['student_4step'])}",
            "", "## Shapes scores after each stage", ""]
  lines += _score_table(records)
  if curve_png:
    lines += ["## Learning curve", "",
              "T2I and edit scores against the U-Net updates of every stage so far: the stage "
              "checks and RL's evaluation sample with the teacher sampler (many steps, CFG), "
              "distillation and eval with the 4-step student; dashed lines are the VAE "
              "ceilings.", "", f"![learning curve]({os.path.basename(curve_png)})", ""]
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
  """Writes `report.md`, `scores.json`, `loss_curves.png` and `learning_curve.png` into
  `workdir`; returns the scores.

  `records`: {stage: DONE record} of the finished stages of `config.stages`, in order
  (`stages.finished_records`).
  """
  scores = build_scores(records)
  scores["learning_curve"] = learning_curve(config, workdir, records)
  loss_png = plot_losses(workdir, list(records), os.path.join(workdir, LOSS_PNG))
  curve_png = plot_learning_curve(scores["learning_curve"], scores["vae"],
                                  os.path.join(workdir, LEARNING_CURVE_PNG))
  epath.Path(workdir, "scores.json").write_text(json.dumps(scores, indent=2, sort_keys=True))
  epath.Path(workdir, "report.md").write_text(
      render_markdown(config, workdir, records, scores, loss_png, curve_png))
  log(f"[job] report: {os.path.join(workdir, 'report.md')}")
  return scores
