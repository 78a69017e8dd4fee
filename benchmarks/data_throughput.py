"""Input pipeline throughput against what a tiny training step consumes.

  python -m benchmarks.data_throughput

Prints examples/s of the grain loader on the synthetic shapes world (joint
T2I + edit mix, 64x64) and on a TFDS `t2i_folder` of 512 JPEGs at 256x256
generated into a temp dir, then the examples/s of one tiny U-Net train step
(`UNetConfig.tiny()`, forward + backward + Adam on the packed 64x64 canvas)
and the headline `ratio_vs_train_step` = shapes loader examples/s / train-step
examples/s (goal >= 10: the loader must never be the bottleneck).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from data_pipelines import loader
from data_pipelines import shapes
from data_pipelines import t2i_folder
from dreamlite_jax.models import unet

BATCH = 32


def _examples_per_s(it, batches: int) -> float:
  next(it)  # warm up threads and first reads
  start = time.perf_counter()
  n = 0
  for _ in range(batches):
    n += len(next(it)["prompt"])
  return n / (time.perf_counter() - start)


def shapes_throughput() -> float:
  t2i = shapes.ShapesT2ISource(size=64, num_examples=10_000)
  edit = shapes.ShapesEditSource(size=64, num_examples=10_000)
  it = loader.make_loader([t2i, edit], weights=[0.7, 0.3], global_batch_size=BATCH,
                          size=(64, 64), crop="center", process_index=0, process_count=1)
  return _examples_per_s(it, batches=40)


def folder_throughput(tmp: Path) -> tuple[float, float]:
  """(examples/s reading, seconds to prepare) for 512 JPEGs at 256x256."""
  root = tmp / "folder"
  root.mkdir()
  rng = np.random.default_rng(0)
  lines = []
  for i in range(512):
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(small).resize((256, 256), Image.BICUBIC).save(root / f"{i:04d}.jpg", quality=90)
    lines.append(json.dumps({"file": f"{i:04d}.jpg", "caption": f"photo number {i}"}))
  (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
  start = time.perf_counter()
  builder, report = t2i_folder.build(root, tmp / "tfds", resolution=256)
  prepare_s = time.perf_counter() - start
  if report.kept != 512:
    raise RuntimeError(f"folder benchmark expected 512 kept items: {report.summary()}")
  source = t2i_folder.T2IFolderSource(builder)
  it = loader.make_loader([source], global_batch_size=BATCH, bucketed=True, crop="random",
                          process_index=0, process_count=1)
  return _examples_per_s(it, batches=2 * 512 // BATCH), prepare_s


def train_step_throughput() -> float:
  """Examples/s of a tiny U-Net train step on 64x64 images."""
  config = unet.UNetConfig.tiny()
  model = unet.DreamLiteUNet(config)
  b, h, w, length = 8, 8, 8, 16  # 64x64 images -> 8x8 latents, packed to 8x16
  rng = np.random.default_rng(0)
  sample = jnp.asarray(rng.standard_normal((b, h, 2 * w, 4)), jnp.float32)
  text = jnp.asarray(rng.standard_normal((b, length, config.encoder_hid_dim)), jnp.float32)
  mask = jnp.ones((b, length), jnp.float32)
  time_ids = jnp.full((b, 2), 64.0, jnp.float32)
  t = jnp.full((b,), 500.0, jnp.float32)
  params = model.init(jax.random.PRNGKey(0), sample, t, text, mask, time_ids)["params"]
  opt = optax.adam(1e-4)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      v = model.apply({"params": p}, sample, t, text, mask, time_ids)
      return jnp.mean((v[:, :, :w] - sample[:, :, :w]) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params, opt_state, loss = step(params, opt_state)  # compile
  loss.block_until_ready()
  steps = 5
  start = time.perf_counter()
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state)
  loss.block_until_ready()
  return steps * b / (time.perf_counter() - start)


def main(argv=None) -> None:
  argparse.ArgumentParser(prog="python -m benchmarks.data_throughput",
                          description=__doc__.split("\n")[0]).parse_args(argv)
  shapes_eps = shapes_throughput()
  print(f"examples_per_s_shapes: {shapes_eps:.1f}")
  with tempfile.TemporaryDirectory() as tmp:
    folder_eps, prepare_s = folder_throughput(Path(tmp))
  print(f"folder_prepare_s_512_jpegs: {prepare_s:.1f}")
  print(f"examples_per_s_folder_256: {folder_eps:.1f}")
  step_eps = train_step_throughput()
  print(f"train_step_examples_per_s: {step_eps:.1f}")
  print(f"ratio_vs_train_step: {shapes_eps / step_eps:.1f}")


if __name__ == "__main__":
  main()
