"""Our samplers reproduce DreamLitePipeline / DreamLiteMobilePipeline latents.

The diffusers pipelines run unchanged (their scheduler, CFG and loop) with a tiny
random DreamLiteUNetModel and fixed text features. Our side starts from the same
initial noise and features and uses either
- "torch": the same torch U-Net through a host callback, so any difference is in
  the schedule, guidance or update (tolerance ~float32 rounding), or
- "flax": our DreamLiteUNet with the torch weights converted by
  `models.weights` (the end-to-end fp32 parity).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamlite_jax.diffusion import flow
from dreamlite_jax.diffusion import sampling
from dreamlite_jax.models import weights
from dreamlite_jax.models.unet import DreamLiteUNet
from tests.diffusion import dreamlite_reference as ref

HEIGHT = WIDTH = 64
TOLERANCE = {"torch": 2e-5, "flax": 2e-5}  # max abs error relative to max(1, |latents|); measured <= 2e-6


@functools.lru_cache(maxsize=1)
def _torch_unet():
  return ref.tiny_unet(seed=0)


@functools.lru_cache(maxsize=1)
def _flax_unet():
  unet = _torch_unet()
  config = weights.unet_config_from_diffusers(dict(unet.config))
  state_dict = {k: v.detach().numpy() for k, v in unet.state_dict().items()}
  params = weights.params_from_state_dict(state_dict, weights.unet_abstract_params(config))
  return DreamLiteUNet(config), params


def _velocity_fn(backend: str):
  if backend == "torch":
    def velocity(canvas, timestep, cond):
      shape = jax.ShapeDtypeStruct(canvas.shape, jnp.float32)
      return jax.pure_callback(functools.partial(ref.torch_velocity, _torch_unet()), shape, canvas,
                               timestep, cond["text"], cond["text_mask"], cond["time_ids"])
    return velocity
  model, params = _flax_unet()

  def velocity(canvas, timestep, cond):
    return model.apply({"params": params}, canvas, timestep, cond["text"], cond["text_mask"],
                       cond["time_ids"])
  return velocity


def _features(rows: int, length: int = 6, seed: int = 0):
  rng = np.random.default_rng(seed)
  embeds = rng.standard_normal((rows, length, ref.TEXT_DIM)).astype(np.float32)
  mask = np.ones((rows, length), np.float32)
  mask[0, 2:] = 0  # the empty prompt is short; the rest is padding
  return embeds, mask


def _source():
  return np.random.default_rng(5).standard_normal((1, 8, 8, 4)).astype(np.float32)


def _cond(embeds, mask, row):
  time_ids = np.array([[WIDTH, HEIGHT]], np.float32)
  return {"text": jnp.asarray(embeds[row:row + 1]), "text_mask": jnp.asarray(mask[row:row + 1]),
          "time_ids": jnp.asarray(time_ids)}


@functools.lru_cache(maxsize=None)
def _reference(case: str):
  """(noise, expected latents, our sampler's arguments) of one pipeline run."""
  if case == "t2i":
    embeds, mask = _features(2)  # rows: [negative, prompt]
    pipe = ref.make_pipeline(_torch_unet(), mobile=False, embeds=embeds, mask=mask)
    noise, expected = ref.reference_latents(pipe, seed=1, height=HEIGHT, width=WIDTH, steps=28,
                                            guidance_scale=3.5)
    args = dict(condition=np.zeros_like(noise), steps=28, cond=_cond(embeds, mask, 1),
                uncond=_cond(embeds, mask, 0), guidance=3.5, image_guidance=None)
  elif case == "edit":
    embeds, mask = _features(3)  # rows: [negative, negative, instruction]
    embeds[1], mask[1] = embeds[0], mask[0]
    pipe = ref.make_pipeline(_torch_unet(), mobile=False, embeds=embeds, mask=mask)
    noise, expected = ref.reference_latents(pipe, seed=2, height=HEIGHT, width=WIDTH, steps=28,
                                            source_latents=_source(), guidance_scale=3.5,
                                            image_guidance_scale=1.3)
    args = dict(condition=_source(), steps=28, cond=_cond(embeds, mask, 2),
                uncond=_cond(embeds, mask, 0), guidance=3.5, image_guidance=1.3)
  else:  # mobile_t2i / mobile_edit
    embeds, mask = _features(1, seed=3)
    mask[0] = 1
    edit = case == "mobile_edit"
    pipe = ref.make_pipeline(_torch_unet(), mobile=True, embeds=embeds, mask=mask)
    noise, expected = ref.reference_latents(pipe, seed=3, height=HEIGHT, width=WIDTH, steps=4,
                                            source_latents=_source() if edit else None)
    np.testing.assert_allclose(flow.timesteps_from_sigmas(flow.schedule_for_size(4, HEIGHT, WIDTH)),
                               pipe.scheduler.timesteps.numpy(), atol=1e-4)
    args = dict(condition=_source() if edit else np.zeros_like(noise), steps=4,
                cond=_cond(embeds, mask, 0), uncond=None, guidance=None, image_guidance=None)
  return noise, expected, args


@functools.lru_cache(maxsize=None)
def _sampler(backend: str):
  """One jitted sampler per backend; cases with equal shapes share a compilation."""
  velocity = _velocity_fn(backend)

  def run(noise, condition, sigmas, cond, uncond, guidance, image_guidance):
    if uncond is None:
      return sampling.few_step_sample(velocity, noise, condition, sigmas, cond)
    return sampling.euler_sample(velocity, noise, condition, sigmas, cond, uncond, guidance,
                                 image_guidance)

  return jax.jit(run)


def _ours(backend, noise, condition, steps, cond, uncond, guidance, image_guidance):
  sigmas = jnp.asarray(flow.schedule_for_size(steps, HEIGHT, WIDTH))
  g = None if guidance is None else jnp.float32(guidance)
  g_img = None if image_guidance is None else jnp.float32(image_guidance)
  return np.asarray(_sampler(backend)(jnp.asarray(noise), jnp.asarray(condition), sigmas, cond,
                                      uncond, g, g_img))


@pytest.mark.parametrize("backend", ["torch", "flax"])
@pytest.mark.parametrize("case", ["t2i", "edit", "mobile_t2i", "mobile_edit"])
def test_sampler_matches_dreamlite_pipelines(case, backend):
  """t2i/edit: DreamLitePipeline, 28 steps, CFG 3.5 (edit: dual guidance, g_img 1.3);
  mobile_*: DreamLiteMobilePipeline, 4 steps, no CFG."""
  noise, expected, args = _reference(case)
  got = _ours(backend, noise, **args)
  scale = max(1.0, float(np.abs(expected).max()))
  err = float(np.abs(got - expected).max())
  assert err <= TOLERANCE[backend] * scale, f"{case}/{backend}: max abs err {err:.2e}"
  # The comparison has teeth: the result is far from the starting noise.
  assert np.abs(expected - noise).max() > 0.1
