"""generate()/edit(): deterministic under a seed, seed- and input-dependent, batched."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dreamlite_jax import pipeline as pipeline_lib
from dreamlite_jax.models.qwen3_vl import Qwen3VLConfig
from dreamlite_jax.models.text_conditioning import TextEncoder
from stand_ins import StandInUNet, StandInVAE

SIZE = 32


@functools.lru_cache(maxsize=1)
def _pipeline():
  text = TextEncoder.random(Qwen3VLConfig.tiny(), seed=0, text_length=16)
  unet, vae = StandInUNet(), StandInVAE()
  hid = text.config.text.hidden_size
  # Jitted init: eager flax init compiles every op on its own (seconds each on a busy CPU).
  unet_params = jax.jit(unet.init)(jax.random.PRNGKey(1), jnp.zeros((1, 4, 8, 4)), jnp.zeros((1,)),
                                   jnp.zeros((1, 16, hid)), jnp.ones((1, 16)),
                                   jnp.zeros((1, 2)))["params"]
  vae_params = jax.jit(vae.init)(jax.random.PRNGKey(2), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
  return pipeline_lib.Pipeline(text, unet, unet_params, vae, vae_params, size_multiple=8)


# All calls use 2 steps at 32x32 so that they share four compiled samplers:
# batch 2 with CFG, batch 1 with CFG, batch 1 without CFG, batch 1 with dual guidance.
KW = dict(steps=2, size=SIZE)


def test_generate_is_deterministic_and_seed_dependent():
  pipe = _pipeline()
  prompts = ["a red circle", "two blue squares"]
  a = pipe.generate(prompts, seed=0, output="np", **KW)
  assert a.shape == (2, SIZE, SIZE, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, pipe.generate(prompts, seed=0, output="np", **KW))
  b = pipe.generate(prompts, seed=1, output="np", **KW)
  assert np.abs(a.astype(int) - b).mean() > 1.0
  # Image i depends on (seed, i) and its own prompt, not on the rest of the batch.
  lat = pipe.generate(prompts, seed=0, output="latent", **KW)
  alone = pipe.generate(prompts[0], seed=0, output="latent", **KW)
  np.testing.assert_allclose(lat[:1], alone, atol=1e-5)
  other = pipe.generate("a green star", seed=0, output="latent", **KW)
  assert np.abs(other - alone).max() > 1e-3
  # No guidance (distilled checkpoints) is a different, still deterministic, sampler.
  free = pipe.generate(prompts[0], seed=0, output="latent", guidance=None, **KW)
  assert np.abs(free - alone).max() > 1e-4
  # Guidance 0 is no CFG too (the config convention), not the unconditional branch alone.
  np.testing.assert_array_equal(
      pipe.generate(prompts[0], seed=0, output="latent", guidance=0.0, **KW), free)
  # Any step count runs through the same compiled sampler of its guidance mode.
  compiled = pipe._denoise._cache_size()
  three = pipe.generate(prompts[0], seed=0, output="latent", steps=3, size=SIZE)
  assert np.abs(three - alone).max() > 1e-4 and pipe._denoise._cache_size() == compiled
  # ... and so do the same params from host memory or from a training mesh.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  for params in (jax.device_get(pipe.unet_params), jax.device_put(
      pipe.unet_params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))):
    again = pipe.with_unet_params(params).generate(prompts[0], seed=0, output="latent", **KW)
    np.testing.assert_array_equal(again, alone)
  assert pipe._denoise._cache_size() == compiled
  pil = pipe.generate(prompts[0], seed=0, **KW)
  assert isinstance(pil[0], Image.Image) and pil[0].size == (SIZE, SIZE)
  with pytest.raises(ValueError, match="multiples of 8"):
    pipe.generate("x", size=30)


def test_edit_is_deterministic_and_uses_the_source():
  pipe = _pipeline()
  rng = np.random.default_rng(0)
  src = rng.integers(0, 256, (SIZE + 4, SIZE + 7, 3), dtype=np.uint8)
  kw = dict(steps=2, output="latent")
  a = pipe.edit(src, "make it blue", seed=0, **kw)
  assert a.shape == (1, 4, 4, 4)  # 36x39 rounded down to multiples of 8 = 32x32
  np.testing.assert_array_equal(a, pipe.edit(Image.fromarray(src), "make it blue", seed=0, **kw))
  assert np.abs(pipe.edit(src, "make it blue", seed=1, **kw) - a).max() > 1e-3
  other = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
  assert np.abs(pipe.edit(other, "make it blue", seed=0, **kw) - a).max() > 1e-4
  # g_img = 1 (the default) is exactly text CFG with the source kept in the negative branch.
  text_only = pipe.edit(src, "make it blue", seed=0, image_guidance=None, **kw)
  np.testing.assert_array_equal(text_only, a)
  dual = pipe.edit(src, "make it blue", seed=0, image_guidance=1.5, **kw)
  assert np.abs(dual - a).max() > 1e-4
  images = pipe.edit([src, other], ["make it blue", "remove it"], seed=0, image_guidance=None,
                     steps=2, size=SIZE, output="np")
  assert images.shape == (2, SIZE, SIZE, 3) and images.dtype == np.uint8
  with pytest.raises(ValueError, match="one image per instruction"):
    pipe.edit([src, other], "make it blue")


def test_cli_generate_and_edit(tmp_path):
  calls = []

  def loader(checkpoint, **kwargs):
    calls.append((checkpoint, kwargs))
    return _pipeline()

  out = tmp_path / "a.png"
  paths = pipeline_lib.main(["generate", "--checkpoint", "run", "--prompt", "a red circle",
                             "--prompt", "a blue square", "--out", str(out), "--steps", "2",
                             "--size", str(SIZE), "--text-encoder", "tiny:0"], loader=loader)
  assert paths == [str(tmp_path / "a_0.png"), str(tmp_path / "a_1.png")]
  first = np.asarray(Image.open(paths[0]))
  assert first.shape == (SIZE, SIZE, 3)
  expected = _pipeline().generate(["a red circle", "a blue square"], seed=0, output="np", **KW)
  np.testing.assert_array_equal(first, expected[0])
  assert calls[0] == ("run", dict(text_encoder="tiny:0", vae_checkpoint=None, step=-1, ema=True))

  Image.fromarray(expected[1]).save(tmp_path / "in.png")
  paths = pipeline_lib.main(["edit", "--checkpoint", "run", "--image", str(tmp_path / "in.png"),
                             "--instruction", "make it green", "--out", str(tmp_path / "b.png"),
                             "--steps", "2", "--guidance", "0", "--no-ema"], loader=loader)
  edited = np.asarray(Image.open(paths[0]))
  np.testing.assert_array_equal(
      edited, _pipeline().edit(expected[1], "make it green", steps=2, guidance=None, output="np")[0])
  assert calls[1][1]["ema"] is False
  with pytest.raises(FileNotFoundError, match="--image"):
    pipeline_lib.main(["edit", "--checkpoint", "run", "--image", str(tmp_path / "none.png"),
                       "--instruction", "x", "--out", str(tmp_path / "c.png")], loader=loader)
