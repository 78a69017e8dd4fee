"""The TextEncoder wrapper: static shapes, prefix dropping, masks, images, one compilation per length."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamlite_jax.models import prompts
from dreamlite_jax.models.qwen3_vl import Qwen3VLConfig, Qwen3VLEncoder
from dreamlite_jax.models.text_conditioning import TextEncoder


@pytest.fixture(scope="module")
def encoder():
  config = Qwen3VLConfig.tiny(use_vision=True)
  return TextEncoder.random(config, 0, text_length=24, edit_text_length=48,
                            edit_image_size=(64, 64))


def test_generate_features_are_the_prompt_tokens_after_the_prefix(encoder):
  texts = ["a red cube", "two blue spheres left of a green cone under a yellow sky"]
  feats, mask = encoder.encode_generate(texts)
  assert feats.shape == (2, 24, 64) and feats.dtype == jnp.float32
  assert mask.shape == (2, 24) and mask.dtype == jnp.int32
  batch = prompts.tokenize_generate(encoder.tokenizer, texts, 24)
  np.testing.assert_array_equal(np.asarray(mask), batch.feature_mask)
  hidden = jax.jit(Qwen3VLEncoder(encoder.config).apply)({"params": encoder.params}, jnp.asarray(batch.ids),
                                                         jnp.asarray(batch.mask))
  n = int(batch.feature_mask[0].sum())
  np.testing.assert_allclose(np.asarray(feats[0, :n]), np.asarray(hidden[0, 34:34 + n]), atol=1e-5)
  assert np.all(np.asarray(feats[0, n:]) == 0.0)
  # A row does not depend on its batch-mates or on padding.
  alone, _ = encoder.encode_generate(texts[:1] * 2)
  np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(feats[0]), atol=1e-5)
  assert encoder._text_fn._cache_size() == 1, "same static length must not recompile"


def test_unconditional_prompt_keeps_five_template_tokens(encoder):
  feats, mask = encoder.encode_generate_unconditional(3)
  assert np.asarray(mask).sum(1).tolist() == [5, 5, 5]
  np.testing.assert_allclose(np.asarray(feats[0]), np.asarray(feats[2]))


def test_edit_with_image_uses_the_image(encoder):
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  feats, mask = encoder.encode_edit(["add a hat", "add a hat"], images)
  assert feats.shape == (2, 48, 64)
  # vision_start + 4 image tokens + vision_end are the first kept tokens.
  assert np.all(np.asarray(mask)[:, :6] == 1)
  assert not np.allclose(np.asarray(feats[0, :6]), np.asarray(feats[1, :6]), atol=1e-4)
  # Images at another size are resized to edit_image_size (nearest-upsampled images resize back closely).
  big, _ = encoder.encode_edit(["add a hat", "add a hat"], np.repeat(np.repeat(images, 2, 1), 2, 2))
  assert big.shape == (2, 48, 64)
  uncond, umask = encoder.encode_edit_unconditional(2, images)
  assert np.asarray(umask).sum(1).tolist() == [6 + 5] * 2
  text_only, tmask = encoder.encode_edit(["add a hat", "add a hat"])
  assert np.asarray(tmask).sum(1).tolist() == (np.asarray(mask).sum(1) - 6).tolist()


def test_bad_inputs_are_rejected(encoder):
  with pytest.raises(ValueError, match="images must be"):
    encoder.encode_edit(["x"], np.zeros((1, 64, 64), np.float32))
  text_only = TextEncoder(Qwen3VLConfig.tiny(use_vision=False), encoder.params, tokenizer=encoder.tokenizer,
                          text_length=8)
  with pytest.raises(ValueError, match="vision tower is off"):
    text_only.encode_edit(["x"], np.zeros((1, 64, 64, 3), np.float32))
