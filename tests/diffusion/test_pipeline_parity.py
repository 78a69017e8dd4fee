"""Our samplers reproduce DreamLitePipeline / DreamLiteMobilePipeline latents.

The diffusers pipelines run unchanged (their scheduler, CFG and loop) with a tiny
random DreamLiteUNetModel and fixed text features. Our side uses the same
initial noise and features, with the same torch U-Net called through a host
callback, so any difference is in the schedule, guidance or update.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamlite_jax.diffusion import flow
from dreamlite_jax.diffusion import sampling
from tests.diffusion import dreamlite_reference as ref

HEIGHT = WIDTH = 64


@functools.lru_cache(maxsize=1)
def _unet():
  return ref.tiny_unet(seed=0)


def _features(rows: int, length: int = 6, seed: int = 0):
  rng = np.random.default_rng(seed)
  embeds = rng.standard_normal((rows, length, ref.TEXT_DIM)).astype(np.float32)
  mask = np.ones((rows, length), np.float32)
  mask[0, 2:] = 0  # the empty prompt is short; the rest is padding
  return embeds, mask


def _callback_velocity_fn(canvas, timestep, cond):
  shape = jax.ShapeDtypeStruct(canvas.shape, jnp.float32)
  return jax.pure_callback(functools.partial(ref.torch_velocity, _unet()), shape, canvas, timestep,
                           cond["text"], cond["text_mask"], cond["time_ids"])


def _cond(embeds, mask, row):
  time_ids = np.array([[WIDTH, HEIGHT]], np.float32)
  return {"text": jnp.asarray(embeds[row:row + 1]), "text_mask": jnp.asarray(mask[row:row + 1]),
          "time_ids": jnp.asarray(time_ids)}


def _ours(noise, condition, steps, cond, uncond=None, g=None, g_img=None):
  sigmas = flow.schedule_for_size(steps, HEIGHT, WIDTH)
  run = jax.jit(lambda z, c: sampling.euler_sample(_callback_velocity_fn, z, c, sigmas, cond, uncond,
                                                   g, g_img))
  return np.asarray(run(jnp.asarray(noise), jnp.asarray(condition)))


def test_t2i_28_step_cfg_matches_dreamlite_pipeline():
  embeds, mask = _features(2)  # rows: [negative, prompt]
  pipe = ref.make_pipeline(_unet(), mobile=False, embeds=embeds, mask=mask)
  noise, expected = ref.reference_latents(pipe, seed=1, height=HEIGHT, width=WIDTH, steps=28,
                                          guidance_scale=3.5)
  got = _ours(noise, np.zeros_like(noise), 28, _cond(embeds, mask, 1), _cond(embeds, mask, 0), 3.5)
  assert np.abs(expected).max() > 0.1
  np.testing.assert_allclose(got, expected, atol=2e-5 * max(1.0, np.abs(expected).max()))


def test_edit_28_step_dual_guidance_matches_dreamlite_pipeline():
  embeds, mask = _features(3)  # rows: [negative, negative, instruction]
  embeds[1], mask[1] = embeds[0], mask[0]
  source = np.random.default_rng(5).standard_normal((1, 8, 8, 4)).astype(np.float32)
  pipe = ref.make_pipeline(_unet(), mobile=False, embeds=embeds, mask=mask)
  noise, expected = ref.reference_latents(pipe, seed=2, height=HEIGHT, width=WIDTH, steps=28,
                                          source_latents=source, guidance_scale=3.5,
                                          image_guidance_scale=1.3)
  got = _ours(noise, source, 28, _cond(embeds, mask, 2), _cond(embeds, mask, 0), 3.5, 1.3)
  np.testing.assert_allclose(got, expected, atol=2e-5 * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("edit", [False, True])
def test_4_step_matches_dreamlite_mobile_pipeline(edit):
  embeds, mask = _features(1, seed=3)
  mask[0] = 1
  source = np.random.default_rng(6).standard_normal((1, 8, 8, 4)).astype(np.float32)
  pipe = ref.make_pipeline(_unet(), mobile=True, embeds=embeds, mask=mask)
  noise, expected = ref.reference_latents(pipe, seed=3, height=HEIGHT, width=WIDTH, steps=4,
                                          source_latents=source if edit else None)
  condition = source if edit else np.zeros_like(noise)
  sigmas = flow.schedule_for_size(4, HEIGHT, WIDTH)
  np.testing.assert_allclose(flow.timesteps_from_sigmas(sigmas), pipe.scheduler.timesteps.numpy(),
                             atol=1e-4)
  got = sampling.few_step_sample(_callback_velocity_fn, jnp.asarray(noise), jnp.asarray(condition),
                                 sigmas, _cond(embeds, mask, 0))
  np.testing.assert_allclose(np.asarray(got), expected, atol=2e-5 * max(1.0, np.abs(expected).max()))
