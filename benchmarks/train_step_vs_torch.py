"""One training step, ours vs PyTorch, same U-Net config, weights and batch, fp32 on CPU.

  python -m benchmarks.train_step_vs_torch [--configs reduced,paper] [--repeats 5]

Ours is the real jitted step (`training.step.make_train_step` with the
flow-matching pretraining loss, `state.make_optimizer`'s clip + AdamW, EMA
and NaN guard). Theirs is diffusers' `DreamLiteUNetModel` with the same
weights (carried over by `models.weights`), the same loss written in torch,
`clip_grad_norm_`, `torch.optim.AdamW` (foreach) and a foreach-lerp EMA, so
both sides do the same work per step; eager, and `torch.compile`d where it
compiles. Configs:
- `reduced`: every DreamLite feature, about a quarter of the paper width
  (runs in a minute on CPU);
- `paper`: the released 0.39B U-Net at a small canvas (latent 16x32).
Small configs interleave ours/theirs step by step; `paper` alternates blocks
(one side's state alive at a time: both at once would need ~16 GB).
Prints medians, ranges and `speedup_vs_torch_<config>` (torch eager median /
ours); the last line is the headline `speedup_vs_torch` of the reduced config.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
from typing import Any, Callable

from benchmarks import timing  # first: sets OpenMP's wait policy before torch loads

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch

from dreamlite_jax.models import weights
from dreamlite_jax.models.unet import DreamLiteUNet, UNetConfig
from dreamlite_jax.training import mesh as mesh_lib
from dreamlite_jax.training import pretrain_loss
from dreamlite_jax.training import state as state_lib
from dreamlite_jax.training import step as step_lib

EMA_DECAY = 0.9999


@dataclasses.dataclass(frozen=True)
class Setup:
  """A U-Net config and the batch shape it is timed at."""
  unet: UNetConfig
  batch: int
  latent: int  # target latent side; the canvas is [latent, 2 * latent]
  text_len: int


REDUCED = UNetConfig(block_out_channels=(64, 128, 224), heads=(2, 4, 7), head_dim=32,
                     cross_attention_dim=576, encoder_hid_dim=512, time_embed_dim=256,
                     addition_time_embed_dim=64)
SETUPS = {
    "tiny": Setup(UNetConfig.tiny(), batch=4, latent=16, text_len=16),
    "reduced": Setup(REDUCED, batch=2, latent=16, text_len=32),
    "paper": Setup(UNetConfig.paper(), batch=1, latent=16, text_len=32),
}


def train_config() -> ml_collections.ConfigDict:
  """The optimiser both sides use: clip 1.0 + AdamW(1e-4, wd 0.01), constant lr."""
  return ml_collections.ConfigDict(dict(lr=1e-4, schedule="constant", warmup_steps=0, steps=1,
                                        end_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8,
                                        weight_decay=0.01, grad_clip=1.0))


def make_batch(setup: Setup, seed: int = 0) -> dict[str, np.ndarray]:
  """A T2I pretraining batch: latents [B, h, h, 4], text [B, L, D], text_mask [B, L]."""
  rng = np.random.default_rng(seed)
  b, h, L = setup.batch, setup.latent, setup.text_len
  mask = np.ones((b, L), np.float32)
  mask[:, L * 3 // 4:] = 0.0  # some right padding, as real prompts have
  return {"latents": rng.standard_normal((b, h, h, 4)).astype(np.float32),
          "text": rng.standard_normal((b, L, setup.unet.encoder_hid_dim)).astype(np.float32),
          "text_mask": mask}


@dataclasses.dataclass
class OurStep:
  """Our compiled step and what it needs; `state` is replaced by every call (donation)."""
  step_fn: Callable
  make_state: Callable[[], Any]
  batch: Any
  rng: jax.Array
  mesh: Any
  abstract_state: Any  # ShapeDtypeStructs with shardings, for AOT lowering
  lr: Any  # the step's learning-rate input
  state: Any = None

  def __call__(self):
    if self.state is None:
      self.state = self.make_state()
    self.state, metrics = self.step_fn(self.state, self.batch, self.rng, self.lr)
    jax.block_until_ready((self.state, metrics))
    return metrics


def _init_params_fn(model: DreamLiteUNet, setup: Setup):
  example = weights.unet_example_inputs(setup.unet, 1, (setup.latent, setup.latent), setup.text_len)
  return lambda rng: model.init(rng, *example)["params"]


def build_our_step(setup: Setup, params: Any | None = None, seed: int = 0) -> OurStep:
  """Our train step on one device; `params` = given weights, or None for a fresh init."""
  model = DreamLiteUNet(setup.unet)
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                            jax.devices()[:1])
  tx = state_lib.make_optimizer(train_config())
  init_params = _init_params_fn(model, setup)
  abstract_state, shardings = state_lib.state_shardings(init_params, tx, mesh)
  if params is None:
    make_state = lambda: state_lib.create_state(init_params, tx, mesh, seed)
  else:
    def from_params(p):
      return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                                  ema_params=jax.tree.map(jnp.copy, p),
                                  rng=jax.random.PRNGKey(seed), skipped=jnp.zeros((), jnp.int32))
    make_state = lambda: jax.jit(from_params, out_shardings=shardings)(params)
  loss_fn = pretrain_loss.make_pretrain_loss(pretrain_loss.unet_predict_fn(model))
  step_fn = step_lib.make_train_step(loss_fn, tx, mesh, shardings, ema_decay=EMA_DECAY)
  batch = mesh_lib.shard_batch(make_batch(setup), mesh)
  rng = jax.device_put(np.zeros((2,), np.uint32), mesh_lib.replicated(mesh))
  lr = step_lib.learning_rate(state_lib.make_schedule(train_config()), 0)
  return OurStep(step_fn, make_state, batch, rng, mesh, abstract_state, lr)


def torch_unet(unet_config: UNetConfig, seed: int = 0):
  from diffusers.models.unets.unet_dreamlite import DreamLiteUNetModel
  torch.manual_seed(seed)
  return DreamLiteUNetModel(**weights.unet_config_to_diffusers(unet_config)).train()


class TorchStep:
  """Flow-matching step in PyTorch: same loss, clip, AdamW and EMA as ours."""

  def __init__(self, unet, setup: Setup, compile_model: bool = False):
    self.unet = unet
    self.forward = torch.compile(unet) if compile_model else unet
    params = [p for p in unet.parameters() if p.requires_grad]
    self.params = params
    t = train_config()
    self.opt = torch.optim.AdamW(params, lr=t.lr, betas=(t.b1, t.b2), eps=t.eps,
                                 weight_decay=t.weight_decay, foreach=True)
    self.ema = [p.detach().clone() for p in params]
    batch = make_batch(setup)
    self.x0 = torch.from_numpy(batch["latents"]).permute(0, 3, 1, 2).contiguous()
    self.text = torch.from_numpy(batch["text"])
    self.mask = torch.from_numpy(batch["text_mask"])
    b, h = setup.batch, setup.latent
    self.time_ids = torch.tensor([[8.0 * h, 8.0 * h]] * b)
    self.gen = torch.Generator().manual_seed(0)

  def __call__(self):
    self.opt.zero_grad(set_to_none=True)
    x0 = self.x0
    sigma = torch.rand(x0.shape[0], generator=self.gen)
    noise = torch.randn(x0.shape, generator=self.gen)
    s = sigma[:, None, None, None]
    canvas = torch.cat([(1 - s) * x0 + s * noise, torch.zeros_like(x0)], dim=-1)
    pred = self.forward(canvas, sigma * 1000.0, encoder_hidden_states=self.text,
                        encoder_attention_mask=self.mask,
                        added_cond_kwargs={"time_ids": self.time_ids}).sample
    loss = torch.mean((pred[..., :x0.shape[-1]] - (noise - x0))**2)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
    self.opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, self.params, 1.0 - EMA_DECAY)
    return loss


def forward_parity(setup: Setup, unet, params) -> float:
  """Max relative error of our forward vs the torch module's on one packed canvas."""
  batch = make_batch(setup)
  x0 = batch["latents"]
  canvas = np.concatenate([x0, np.zeros_like(x0)], axis=2)
  t = np.full((setup.batch,), 500.0, np.float32)
  time_ids = np.full((setup.batch, 2), 8.0 * setup.latent, np.float32)
  ours = np.asarray(DreamLiteUNet(setup.unet).apply({"params": params}, canvas, t, batch["text"],
                                                    batch["text_mask"], time_ids))
  with torch.no_grad():
    ref = unet.eval()(torch.from_numpy(canvas).permute(0, 3, 1, 2), torch.from_numpy(t),
                      encoder_hidden_states=torch.from_numpy(batch["text"]),
                      encoder_attention_mask=torch.from_numpy(batch["text_mask"]),
                      added_cond_kwargs={"time_ids": torch.from_numpy(time_ids)}).sample
  unet.train()
  ref = ref.permute(0, 2, 3, 1).numpy()
  return float(np.abs(ours - ref).max() / (np.abs(ref).max() + 1e-12))


def _try_compile(unet, setup: Setup) -> TorchStep | None:
  try:
    step = TorchStep(unet, setup, compile_model=True)
    step()  # compiles forward + backward
    return step
  except Exception as e:  # inductor needs a working C++ toolchain; report, don't fail
    print(f"torch_compile_error: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return None


def run_setup(name: str, setup: Setup, repeats: int, warmup: int, use_compile: bool) -> float:
  """Times one setup; prints its lines; returns the eager speedup."""
  unet = torch_unet(setup.unet)
  state_dict = {k: v.detach().numpy().copy() for k, v in unet.state_dict().items()}
  params = weights.params_from_state_dict(state_dict, weights.unet_abstract_params(setup.unet))
  print(f"{name}_params: {sum(p.numel() for p in unet.parameters())}")
  print(f"{name}_batch: {setup.batch} canvas {setup.latent}x{2 * setup.latent} text {setup.text_len}")
  print(f"{name}_forward_max_rel_err: {forward_parity(setup, unet, params):.2e}")
  ours = build_our_step(setup, params)
  if name != "paper":
    contenders = {"ours": ours, "torch_eager": TorchStep(unet, setup)}
    if use_compile:
      compiled = _try_compile(torch_unet(setup.unet), setup)
      if compiled is not None:
        compiled.unet.load_state_dict(unet.state_dict())
        contenders["torch_compile"] = compiled
    times = timing.interleaved(contenders, warmup=warmup, repeats=repeats)
  else:
    # One side alive at a time: ours, torch, ours, torch ... (blocks of `repeats`).
    times = {"ours": [], "torch_eager": []}
    ours()  # compile
    del unet
    for _ in range(2):
      times["ours"] += timing.interleaved({"ours": ours}, warmup=1, repeats=repeats)["ours"]
      ours.state = None
      gc.collect()
      torch_step = TorchStep(_loaded_unet(setup.unet, state_dict), setup)
      times["torch_eager"] += timing.interleaved({"t": torch_step}, warmup=1, repeats=repeats)["t"]
      del torch_step
      gc.collect()
  medians = {k: timing.report(f"{name}_{k}", v) for k, v in times.items()}
  speedup = medians["torch_eager"] / medians["ours"]
  print(f"{name}_images_per_second_ours: {setup.batch / medians['ours']:.3f}")
  if "torch_compile" in medians:
    print(f"speedup_vs_torch_compile_{name}: {medians['torch_compile'] / medians['ours']:.3f}")
  print(f"speedup_vs_torch_{name}: {speedup:.3f}")
  return speedup


def _loaded_unet(unet_config: UNetConfig, state_dict: dict[str, np.ndarray]):
  unet = torch_unet(unet_config)
  unet.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
  return unet


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="reduced,paper", help=f"comma list of {sorted(SETUPS)}")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
  args = parser.parse_args()
  names = args.configs.split(",")
  unknown = [n for n in names if n not in SETUPS]
  if unknown:
    parser.error(f"unknown --configs {unknown}; choose from {sorted(SETUPS)}")
  print(f"device: {jax.devices()[0].device_kind} jax {jax.__version__} torch {torch.__version__} "
        f"torch_threads {torch.get_num_threads()}")
  speedups = {n: run_setup(n, SETUPS[n], args.repeats, args.warmup, not args.no_compile)
              for n in names}
  headline = speedups.get("reduced", next(iter(speedups.values())))
  print(f"speedup_vs_torch: {headline:.3f}")


if __name__ == "__main__":
  main()
