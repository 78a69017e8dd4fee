"""The job's `convert` stage: the final U-Net, the VAE and the text encoder -> gated TFLite files.

Calls `converters.export.export_all` (every file passes `gpu_check` with zero
findings and the numerics gate, or the export fails) on the parent stage's
U-Net (the distilled student when the job distils) at the job's image size,
and reports the files with their gate results.
"""
from __future__ import annotations

import os

from dreamlite_jax.config import ConfigError
from dreamlite_jax.training import checkpoints


def run_stage(ctx) -> dict:
  from converters import export  # pulls TensorFlow: only when a job converts

  if not ctx.parent_workdir:
    raise ConfigError(f"config.{ctx.name}.parent must name the stage whose U-Net is exported")
  section = ctx.section
  models = ctx.models
  params = checkpoints.load_params(ctx.parent_workdir, ema=bool(section.use_ema))
  te = models.text_encoder
  deploy = export.DeployModels(models.unet, params, models.vae, models.vae_params, te.model,
                               te.params, text_len=te.text_length,
                               latent_scaling=models.vae_config.scaling_factor,
                               latent_shift=models.vae_config.shift_factor)
  out_dir = os.path.join(ctx.workdir, "tflite")
  size = models.image_size
  manifest = export.export_all(deploy, out_dir, section.precision, (size, size),
                               tokenizer=te.tokenizer)
  files = []
  for name, entry in manifest["models"].items():
    files.append({"name": name, "file": os.path.join("tflite", entry["file"]),
                  "bytes": entry["bytes"], "gpu_check_findings": entry["gpu_check_findings"],
                  "max_abs_err": entry["numerics"]["max_abs_err"],
                  "max_rel_err": entry["numerics"]["max_rel_err"],
                  "min_psnr_db": entry["numerics"]["min_psnr_db"]})
  return {"convert": {
      "precision": section.precision,
      "gpu_check_findings": int(sum(f["gpu_check_findings"] for f in files)),
      f"max_abs_err_{section.precision}": float(max(f["max_abs_err"] for f in files)),
      "files": files, "exported": ctx.parent_workdir}}
