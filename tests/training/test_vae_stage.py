"""The VAE stage's loss weighting and crop batches (what lets the tiny VAE learn in CPU minutes)."""
import jax.numpy as jnp
import numpy as np
import pytest

from dreamlite_jax.job import vae_stage


class _ConstantVAE:
  """Encodes to zeros and decodes to a grey (0.0) image: the reconstruction error is known."""

  def apply(self, variables, x, method):
    if method == "encode":
      return jnp.zeros((x.shape[0], 1, 1, 4))
    return jnp.zeros((x.shape[0], 8, 8, 3))


def _image_with_object():
  """8x8 black (-1) background, a 2x2 object of value 0.5 (error 0.5 against grey)."""
  x = -np.ones((1, 8, 8, 3), np.float32)
  x[:, 3:5, 3:5, :] = 0.5
  return x


@pytest.mark.parametrize("weight", [0.0, 4.0])
def test_foreground_weight_reweights_object_pixels(weight):
  x = _image_with_object()
  _, metrics = vae_stage.vae_loss(_ConstantVAE(), None, {"images": jnp.asarray(x)}, 1.0, 1.0, 0.0,
                                  foreground_weight=weight)
  n_fg, n_bg = 4, 60
  w_fg = 1.0 + weight
  expected_l1 = (n_bg * 1.0 + w_fg * n_fg * 0.5) / (n_bg + w_fg * n_fg)
  expected_mse = (n_bg * 1.0 + w_fg * n_fg * 0.25) / (n_bg + w_fg * n_fg)
  np.testing.assert_allclose(float(metrics["l1"]), expected_l1, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["mse"]), expected_mse, rtol=1e-6)
  # PSNR stays the plain, unweighted figure whatever the weighting.
  plain_mse = (n_bg * 1.0 + n_fg * 0.25) / 64
  np.testing.assert_allclose(float(metrics["psnr_db"]), 10 * np.log10(4.0 / plain_mse), rtol=1e-5)


def test_crop_batches_are_windows_of_the_images_and_resume_exactly():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(10, 12, 12, 3), dtype=np.uint8)
  data = vae_stage.ImageBatches(images, batch_size=4, seed=3, crop_size=5)
  first = next(data)["images"]
  assert first.shape == (4, 5, 5, 3)
  assert first.min() >= -1.0 and first.max() <= 1.0
  as_uint8 = np.round((first + 1.0) * 127.5).astype(np.uint8)
  for crop in as_uint8:  # every crop is some 5x5 window of some image
    assert any(np.array_equal(crop, img[y:y + 5, x:x + 5])
               for img in images for y in range(8) for x in range(8))
  state = data.get_state()
  expected = next(data)["images"]
  resumed = vae_stage.ImageBatches(images, batch_size=4, seed=3, crop_size=5)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["images"], expected)


def test_crop_larger_than_the_images_is_named():
  images = np.zeros((2, 8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match=r"config\.vae\.data\.crop_size = 9"):
    vae_stage.ImageBatches(images, batch_size=2, seed=0, crop_size=9)


def test_ceilings_score_round_trips_of_the_evaluation_sets():
  """A lossless VAE has ceilings 1.0; one that loses the objects has a T2I ceiling 0."""
  exact = vae_stage.ceilings(lambda x: x, 32, per_category=2, per_type=2)
  assert {k: exact[k] for k in ("ceiling_t2i", "ceiling_t2i_heldout", "ceiling_edit",
                                "ceiling_edit_heldout")} == {
      "ceiling_t2i": 1.0, "ceiling_t2i_heldout": 1.0, "ceiling_edit": 1.0,
      "ceiling_edit_heldout": 1.0}
  assert set(exact["ceiling_scores"]["edit"]) >= {"move", "heldout/replace"}
  # Every pixel the corner's colour: the background survives, no object does.
  blank = vae_stage.ceilings(lambda x: np.broadcast_to(x[:, :1, :1], x.shape).copy(), 32,
                             per_category=2, per_type=2, batch=5)
  assert blank["ceiling_t2i"] == 0.0 and blank["ceiling_t2i_heldout"] == 0.0
  assert blank["ceiling_edit_heldout"] == 0.0
  assert blank["ceiling_scores"]["edit"]["add"] == 0.0
