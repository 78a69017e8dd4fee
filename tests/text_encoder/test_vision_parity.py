"""Vision tower and the merged image+text (M-RoPE, deepstack) forward vs transformers."""
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from hf_reference import IMAGE_TOKEN, VISION_END, VISION_START, last_layer_output, rel_err
from dreamlite_jax.models.qwen3_vl import Qwen3VLEncoder, mrope_position_ids
from dreamlite_jax.models.text_weights import load_qwen3_vl
from dreamlite_jax.models.vision_encoder import Qwen3VisionModel, patchify

TOL = 1e-4
H, W = 64, 96                       # 4 x 6 patches of 16 -> 2 x 3 merged tokens (h != w tests M-RoPE)


def _images(n):
  return (np.random.default_rng(1).random((n, H, W, 3)) * 255).astype(np.uint8)


def _hf_pixels(images):
  proc = transformers.Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2,
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3, do_resize=False)
  out = proc(images=list(images), return_tensors="np")
  return out["pixel_values"], out["image_grid_thw"]


def test_patchify_matches_transformers_image_processor(hf_vl):
  model, directory = hf_vl
  config, _ = load_qwen3_vl(directory)
  images = _images(2)
  pixels, grid = _hf_pixels(images)
  ours = patchify(jnp.asarray(images / 127.5 - 1.0, jnp.float32), config.vision)
  assert grid.tolist() == [[1, 4, 6]] * 2
  np.testing.assert_allclose(np.asarray(ours).reshape(pixels.shape), pixels, atol=1e-5)


def test_vision_tower_matches_transformers(hf_vl):
  model, directory = hf_vl
  config, params = load_qwen3_vl(directory)
  images = _images(2)
  pixels, grid = _hf_pixels(images)
  with torch.no_grad():
    ref = model.model.visual(torch.tensor(pixels), grid_thw=torch.tensor(grid))
  patches = patchify(jnp.asarray(images / 127.5 - 1.0, jnp.float32), config.vision)
  tokens, deepstack = jax.jit(Qwen3VisionModel(config.vision).apply, static_argnums=(2,))({"params": params["visual"]}, patches, (4, 6))
  assert rel_err(np.asarray(tokens).reshape(-1, 64), ref.pooler_output.numpy()) <= TOL
  assert deepstack.shape == (2, 2, 6, 64)
  for k, feat in enumerate(ref.deepstack_features):
    assert rel_err(np.asarray(deepstack[k]).reshape(-1, 64), feat.numpy()) <= TOL


def _image_prompt_batch():
  """Two rows: text, <vision_start>, 6 image tokens, <vision_end>, text; row 1 right-padded."""
  rng = np.random.default_rng(2)
  rows = []
  for n_before, n_after in ((5, 7), (3, 4)):
    rows.append(list(rng.integers(0, 290, n_before)) + [VISION_START] + [IMAGE_TOKEN] * 6 + [VISION_END]
                + list(rng.integers(0, 290, n_after)))
  length = max(map(len, rows))
  ids = np.zeros((2, length), np.int32)
  mask = np.zeros((2, length), np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)] = r, 1
  return ids, mask


def test_merged_image_text_forward_matches_transformers(hf_vl):
  model, directory = hf_vl
  ids, mask = _image_prompt_batch()
  images = _images(2)
  pixels, grid = _hf_pixels(images)
  t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)
  mm_types = (t_ids == IMAGE_TOKEN).int()
  ref_pos, _ = model.model.get_rope_index(t_ids, mm_types, image_grid_thw=torch.tensor(grid),
                                          attention_mask=t_mask)
  positions = mrope_position_ids(ids, mask, IMAGE_TOKEN, (2, 3))
  np.testing.assert_array_equal(positions, ref_pos.numpy())
  ref_pre, ref_post = last_layer_output(model, input_ids=t_ids, attention_mask=t_mask,
                                        pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grid),
                                        mm_token_type_ids=mm_types)
  patches = patchify(jnp.asarray(images / 127.5 - 1.0, jnp.float32), load_qwen3_vl(directory)[0].vision)
  for final_norm, ref in ((False, ref_pre), (True, ref_post)):
    config, params = load_qwen3_vl(directory, final_norm=final_norm)
    ours = jax.jit(Qwen3VLEncoder(config).apply, static_argnums=(4,))({"params": params}, jnp.asarray(ids), jnp.asarray(mask), patches,
                                        (4, 6), jnp.asarray(positions))
    err = rel_err(ours, ref)
    assert err <= TOL, f"final_norm={final_norm}: relative max error {err:.2e}"
