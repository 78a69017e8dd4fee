"""Does the paper-scale train step fit? AOT-compile it on N devices and read XLA's numbers.

  python -m benchmarks.scale_check --config experiments/dreamlite_1024_pretrain_joint.py --devices 8

Builds the U-Net from `config.model.unet`, the mesh from `config.mesh` and the
step from the section of the config's first stage (`--stage` picks another)
(with the device count forced to `--devices` simulated CPU devices unless real
accelerators are present), and lowers + compiles the real train step (the
flow-matching pretraining loss, AdamW, EMA, NaN guard) on abstract inputs: no
parameter is ever allocated. Prints per-device parameter / optimiser / EMA
bytes (from the shardings), XLA's memory analysis (arguments, outputs,
temporaries) and cost analysis (FLOPs per step). On a GPU/TPU host it also runs
a few real steps and reports step time and MFU (`--peak-tflops` per device).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys


def _parse() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--stage", default="",
                      help="the pretrain-kind stage whose step to check (default: the first listed)")
  parser.add_argument("--per-device-batch", type=int, default=1,
                      help="microbatch examples per device for the check (global = this x devices)")
  parser.add_argument("--resolution", type=int, default=0,
                      help="target side in pixels (default: the last of the stage's data.resolutions)")
  parser.add_argument("--peak-tflops", type=float, default=0.0,
                      help="per-device peak bf16 TFLOP/s for MFU (0 = guess from device kind)")
  parser.add_argument("--steps", type=int, default=5, help="timed steps on real accelerators")
  parser.add_argument("overrides", nargs="*", help="--config.a.b=v overrides")
  args, unknown = parser.parse_known_args()
  args.overrides = list(args.overrides) + unknown
  return args


def _accelerator_present() -> bool:
  """GPU or TPU device files (checked before jax starts, to pick the XLA flags)."""
  return os.path.exists("/dev/nvidia0") or bool(glob.glob("/dev/accel*")) or bool(
      glob.glob("/dev/vfio/[0-9]*"))


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and "XLA_FLAGS" not in os.environ and not _accelerator_present():
  # Must be set before jax initialises its CPU backend. The simulated CPU step is
  # only compiled, never run, so LLVM's optimisation passes (most of the compile
  # time) are skipped; XLA's memory and cost analyses come from the HLO and do
  # not depend on them.
  os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={ARGS.devices} "
                             "--xla_backend_optimization_level=0 "
                             "--xla_llvm_disable_expensive_passes=true")

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dreamlite_jax.config import apply_overrides, load_config_file  # noqa: E402
from dreamlite_jax.models.unet import DreamLiteUNet, UNetConfig  # noqa: E402
from dreamlite_jax.training import mesh as mesh_lib  # noqa: E402
from dreamlite_jax.training import pretrain_loss  # noqa: E402
from dreamlite_jax.training import state as state_lib  # noqa: E402
from dreamlite_jax.training import step as step_lib  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5p": 459.0, "TPU v4": 275.0,
               "TPU v5 lite": 197.0, "TPU v6 lite": 918.0}


def _gib(n: float) -> str:
  return f"{n / 2**30:.3f}"


def _per_device_bytes(tree, shardings) -> float:
  """Bytes of `tree` held by one device under `shardings` (largest shard)."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shard = sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
  return total


def build(config, section, devices, per_device_batch: int, resolution: int):
  """(jitted step, abstract state, shardings, abstract batch, abstract rng and lr, mesh, host batch)."""
  unet_config = UNetConfig.from_dict(config.model.unet.to_dict())
  compute_dtype = state_lib.DTYPES[section.train.compute_dtype]
  model = DreamLiteUNet(unet_config)
  text_len = config.model.text_encoder.text_length
  text_dim = unet_config.encoder_hid_dim
  latent = resolution // 8

  def init_params(rng):
    return model.init(rng, jnp.zeros((1, latent, 2 * latent, 4)), jnp.zeros((1,)),
                      jnp.zeros((1, text_len, text_dim)), jnp.ones((1, text_len)),
                      jnp.zeros((1, 2)))["params"]

  loss_config = pretrain_loss.PretrainLossConfig(**section.loss.to_dict())
  loss_fn = pretrain_loss.make_pretrain_loss(pretrain_loss.unet_predict_fn(model), loss_config)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  tx = state_lib.make_optimizer(section.train)
  abstract_state, shardings = state_lib.state_shardings(init_params, tx, mesh)
  batch_size = per_device_batch * len(devices)
  batch = {
      "latents": np.zeros((batch_size, latent, latent, 4), np.float32),
      "source_latents": np.zeros((batch_size, latent, latent, 4), np.float32),
      "is_edit": np.zeros((batch_size,), np.float32),
      "text": np.zeros((batch_size, text_len, text_dim), compute_dtype),
      "text_mask": np.ones((batch_size, text_len), np.float32),
  }
  if loss_config.text_dropout > 0:
    batch["null_text"] = np.zeros((batch_size, text_len, text_dim), compute_dtype)
    batch["null_text_mask"] = np.zeros((batch_size, text_len), np.float32)
  step_fn = step_lib.make_train_step(loss_fn, tx, mesh, shardings, accum_steps=1,
                                     compute_dtype=compute_dtype,
                                     ema_decay=section.train.ema_decay)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=mesh_lib.replicated(mesh))
  lr = jax.ShapeDtypeStruct((), jnp.float32, sharding=mesh_lib.replicated(mesh))
  return step_fn, abstract_state, shardings, step_lib.abstract_batch(batch, mesh), rng, lr, mesh, batch


def main(args: argparse.Namespace) -> None:
  config = apply_overrides(load_config_file(args.config), args.overrides)
  stage = args.stage or config.stages.split(",")[0].strip()
  section = config[stage]
  if section.kind != "pretrain":
    sys.exit(f"--stage {stage}: a {section.kind} stage; scale_check compiles pretrain-kind steps")
  devices = jax.devices()
  if len(devices) < args.devices:
    sys.exit(f"asked for --devices {args.devices} but jax sees {len(devices)} ({devices[0].platform})")
  devices = devices[:args.devices]
  resolution = args.resolution or section.data.resolutions[-1][0]
  step_fn, abstract_state, shardings, batch, rng, lr, mesh, host_batch = build(
      config, section, devices, args.per_device_batch, resolution)
  n_params = state_lib.param_count(abstract_state.params)
  fraction = mesh_lib.assert_params_sufficiently_sharded(
      abstract_state.params, shardings.params, mesh, config.mesh.max_replicated_fraction)
  print(f"config: {args.config} (stage {stage})")
  print(f"devices: {len(devices)} x {devices[0].device_kind}")
  print(f"mesh: {dict(mesh.shape)}")
  print(f"global_batch: {batch['latents'].shape[0]} at {resolution}x{resolution} "
        f"(canvas latent {batch['latents'].shape[1]}x{2 * batch['latents'].shape[2]})")
  print(f"compute_dtype: {section.train.compute_dtype}")
  print(f"unet_params: {n_params}")
  print(f"replicated_param_fraction: {fraction:.4f}")
  print(f"params_per_device_gib: {_gib(_per_device_bytes(abstract_state.params, shardings.params))}")
  print(f"ema_per_device_gib: {_gib(_per_device_bytes(abstract_state.ema_params, shardings.ema_params))}")
  print(f"optimizer_per_device_gib: "
        f"{_gib(_per_device_bytes(abstract_state.opt_state, shardings.opt_state))}", flush=True)
  start = time.perf_counter()
  lowered = step_fn.lower(abstract_state, batch, rng, lr)
  print(f"lower_seconds: {time.perf_counter() - start:.1f}", flush=True)
  start = time.perf_counter()
  compiled = lowered.compile()
  print(f"compile_seconds: {time.perf_counter() - start:.1f}", flush=True)
  memory = compiled.memory_analysis()
  if memory is not None:
    print(f"xla_argument_per_device_gib: {_gib(memory.argument_size_in_bytes)}")
    print(f"xla_output_per_device_gib: {_gib(memory.output_size_in_bytes)}")
    print(f"xla_alias_per_device_gib: {_gib(memory.alias_size_in_bytes)}")
    print(f"xla_temp_per_device_gib: {_gib(memory.temp_size_in_bytes)}")
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    print(f"xla_peak_estimate_per_device_gib: {_gib(peak)}")
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  # XLA reports the FLOPs of one device's partitioned program.
  print(f"step_flops_per_device: {flops:.4e}")
  print(f"step_flops_total: {flops * len(devices):.4e}")
  if devices[0].platform in ("gpu", "tpu", "cuda", "rocm"):
    _time_steps(args, compiled, abstract_state, shardings, host_batch, mesh, flops, devices)


def _time_steps(args, compiled, abstract_state, shardings, host_batch, mesh, flops, devices):
  """Real accelerators: run the compiled step on zero-filled inputs and report MFU."""
  state = jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_state),
                  out_shardings=shardings)()
  batch = mesh_lib.shard_batch(host_batch, mesh)
  rng = jax.device_put(np.zeros((2,), np.uint32), mesh_lib.replicated(mesh))
  lr = jax.device_put(np.float32(1e-4), mesh_lib.replicated(mesh))
  state, metrics = compiled(state, batch, rng, lr)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, batch, rng, lr)
  jax.block_until_ready(metrics)
  step_time = (time.perf_counter() - start) / args.steps
  peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in devices[0].device_kind), 0.0)
  print(f"step_seconds: {step_time:.4f}")
  if peak:
    print(f"mfu: {flops / step_time / (peak * 1e12):.4f}")


if __name__ == "__main__":
  main(ARGS)
