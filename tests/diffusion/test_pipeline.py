"""generate()/edit(): deterministic under a seed, seed- and input-dependent, batched."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dreamlite_jax import pipeline as pipeline_lib
from dreamlite_jax.models.qwen3_vl import Qwen3VLConfig
from dreamlite_jax.models.text_conditioning import TextEncoder

SIZE = 32


class StandInUNet(nn.Module):
  """The U-Net call signature with a few layers that use every input."""

  @nn.compact
  def __call__(self, sample, timestep, text, text_mask, time_ids):
    m = text_mask.astype(jnp.float32)[..., None]
    pooled = (text * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    h = nn.Conv(8, (3, 3))(sample)
    h = h + nn.Dense(8)(pooled)[:, None, None] + nn.Dense(8)(timestep[:, None] / 1000.0)[:, None, None]
    h = h + nn.Dense(8)(time_ids / 1024.0)[:, None, None]
    return nn.Conv(4, (3, 3))(nn.silu(h))


class StandInVAE(nn.Module):

  def setup(self):
    self.enc = nn.Dense(4)
    self.dec = nn.Dense(3)

  def encode(self, x):
    b, h, w, _ = x.shape
    return self.enc(x.reshape(b, h // 8, 8, w // 8, 8, 3).mean((2, 4)))

  def decode(self, z):
    b, h, w, _ = z.shape
    return jnp.tanh(jax.image.resize(self.dec(z), (b, h * 8, w * 8, 3), "nearest"))

  def __call__(self, x):
    return self.decode(self.encode(x))


@functools.lru_cache(maxsize=1)
def _pipeline():
  text = TextEncoder.random(Qwen3VLConfig.tiny(), seed=0, text_length=16)
  unet, vae = StandInUNet(), StandInVAE()
  hid = text.config.text.hidden_size
  unet_params = unet.init(jax.random.PRNGKey(1), jnp.zeros((1, 4, 8, 4)), jnp.zeros((1,)),
                          jnp.zeros((1, 16, hid)), jnp.ones((1, 16)), jnp.zeros((1, 2)))["params"]
  vae_params = vae.init(jax.random.PRNGKey(2), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
  return pipeline_lib.Pipeline(text, unet, unet_params, vae, vae_params, size_multiple=8)


def test_generate_is_deterministic_and_seed_dependent():
  pipe = _pipeline()
  kw = dict(steps=3, guidance=3.5, size=SIZE)
  a = pipe.generate(["a red circle", "two blue squares"], seed=0, output="np", **kw)
  assert a.shape == (2, SIZE, SIZE, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, pipe.generate(["a red circle", "two blue squares"], seed=0,
                                                 output="np", **kw))
  b = pipe.generate(["a red circle", "two blue squares"], seed=1, output="np", **kw)
  assert np.abs(a.astype(int) - b).mean() > 1.0
  # Image i depends on (seed, i) and its own prompt, not on the rest of the batch.
  lat = pipe.generate(["a red circle", "two blue squares"], seed=0, output="latent", **kw)
  alone = pipe.generate("a red circle", seed=0, output="latent", **kw)
  np.testing.assert_allclose(lat[:1], alone, atol=1e-5)
  other = pipe.generate("a green star", seed=0, output="latent", **kw)
  assert np.abs(other - alone).max() > 1e-3
  # No guidance (distilled checkpoints) is a different, still deterministic, sampler.
  free = pipe.generate("a red circle", seed=0, output="latent", steps=3, guidance=None, size=SIZE)
  assert np.abs(free - alone).max() > 1e-4
  pil = pipe.generate("a red circle", seed=0, steps=3, size=(SIZE, SIZE))
  assert isinstance(pil[0], Image.Image) and pil[0].size == (SIZE, SIZE)


def test_edit_is_deterministic_and_uses_the_source():
  pipe = _pipeline()
  rng = np.random.default_rng(0)
  src = rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)
  kw = dict(steps=3, output="latent")
  a = pipe.edit(src, "make it blue", seed=0, **kw)
  assert a.shape == (1, 5, 5, 4)  # 40x44 rounded down to multiples of 8
  np.testing.assert_array_equal(a, pipe.edit(Image.fromarray(src), "make it blue", seed=0, **kw))
  assert np.abs(pipe.edit(src, "make it blue", seed=1, **kw) - a).max() > 1e-3
  other = rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)
  assert np.abs(pipe.edit(other, "make it blue", seed=0, **kw) - a).max() > 1e-4
  dual = pipe.edit(src, "make it blue", seed=0, image_guidance=2.0, **kw)
  assert np.abs(dual - a).max() > 1e-4
  images = pipe.edit([src, other], ["make it blue", "remove it"], seed=0, steps=2, size=SIZE,
                     output="np")
  assert images.shape == (2, SIZE, SIZE, 3) and images.dtype == np.uint8
  with pytest.raises(ValueError, match="one image per instruction"):
    pipe.edit([src, other], "make it blue")
  with pytest.raises(ValueError, match="multiples of 8"):
    pipe.generate("x", size=30)


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
  expected = _pipeline().generate(["a red circle", "a blue square"], seed=0, steps=2, size=SIZE,
                                  output="np")
  np.testing.assert_array_equal(first, expected[0])
  assert calls[0] == ("run", dict(text_encoder="tiny:0", vae_checkpoint=None, step=-1, ema=True))

  Image.fromarray(expected[1]).save(tmp_path / "in.png")
  paths = pipeline_lib.main(["edit", "--checkpoint", "run", "--image", str(tmp_path / "in.png"),
                             "--instruction", "make it green", "--out", str(tmp_path / "b.png"),
                             "--steps", "2", "--guidance", "0", "--no-ema"], loader=loader)
  edited = np.asarray(Image.open(paths[0]))
  np.testing.assert_array_equal(
      edited, _pipeline().edit(expected[1], "make it green", steps=2, guidance=None,
                               output="np")[0])
  assert calls[1][1]["ema"] is False
  with pytest.raises(FileNotFoundError, match="--image"):
    pipeline_lib.main(["edit", "--checkpoint", "run", "--image", str(tmp_path / "none.png"),
                       "--instruction", "x", "--out", str(tmp_path / "c.png")], loader=loader)
