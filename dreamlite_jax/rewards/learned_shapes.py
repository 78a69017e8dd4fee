"""A small learned image-text reward for the shapes world, differentiable in the image.

The programmatic evaluator is exact but not differentiable, and ReFL needs a
reward gradient with respect to the pixels. A generic image-text matcher (one
logit from a joint transformer) learns this slowly and does not generalise to
unseen colour-shape pairs, so the reward is structured instead:

  image  -> `SceneEncoder` (a small CNN on the image resized to 64x64) predicts a
            scene summary on an 8x8 grid of 8-pixel cells: per cell the logit that
            an object's centre lies in it and, separately, its colour and shape
            logits; plus the background's logits. Colour and shape are separate
            heads, so an unseen pair is two seen attributes (compositional).
  text   -> `shapes_text.encode` parses the caption with the closed vocabulary
            into the same structure (objects with colour/shape/count, total
            count, background, relation between two objects).
  reward -> `agreement`: soft counts of every claimed (colour, shape) from the
            grid, compared with the claimed counts by a Cauchy kernel (gradient
            does not vanish far from the target), times the same for the total
            object count, the background probability and, for a relation, a
            sigmoid of the soft centroids' offset along its axis. In [0, 1].

The encoder is trained on generator renders with their metadata as supervision
(`train_shapes_reward`); its weights ship as `weights/shapes_reward.safetensors`
(float16, about 0.2 MB) with their held-in and held-out AUCs in the metadata.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import numpy as st_numpy

from data_pipelines import shapes
from dreamlite_jax.rewards import image_text
from dreamlite_jax.rewards import shapes_text

WEIGHTS_PATH = os.path.join(os.path.dirname(__file__), "weights", "shapes_reward.safetensors")
IMAGE_SIDE = 64
GRID = 8  # cells per side; one cell = IMAGE_SIDE / GRID pixels
NUM_COLORS, NUM_SHAPES, NUM_BACKGROUNDS = len(shapes.COLORS), len(shapes.SHAPES), len(
    shapes.BACKGROUNDS)
COUNT_SCALE = 0.3      # Cauchy kernel width of a count agreement (objects)
RELATION_MARGIN = 0.05  # a relation needs this offset (fraction of the image side) ...
RELATION_TEMP = 0.04    # ... with this sigmoid temperature
# The background head is linear in the image's median and mean colour. In raw [-1, 1]
# units the world's backgrounds (black, gray 56) sit at -1 and -0.56: every feature is
# negative, so the kernel's gradient runs along the bias's and the head learned only the
# prior (a gray background read at p = 0.54 after 1,200 steps, halving every gray image's
# reward). Centred on the palette's mean and scaled by its spread, they sit at -1 and +1.
_BACKGROUND_RGB = np.asarray(list(shapes.BACKGROUNDS.values()), np.float32) / 127.5 - 1.0
BACKGROUND_CENTER = np.tile(_BACKGROUND_RGB.mean(0), 2)  # [6]: median, then mean colour
BACKGROUND_SCALE = float(2.0 / max(np.ptp(_BACKGROUND_RGB), 0.25))


@dataclasses.dataclass(frozen=True)
class ShapesRewardConfig:
  widths: tuple[int, ...] = (16, 32, 48)  # stride-2 stages: 64 -> 32 -> 16 -> 8
  head_width: int = 64


class SceneEncoder(nn.Module):
  """`apply(vars, images [B, H, W, 3] in [-1, 1], contrast=None)` -> dict of logits:
  center [B, 8, 8], color [B, 8, 8, 6], shape [B, 8, 8, 4], background [B, 2].

  Two pathways keep colour and shape apart, so an unseen colour-shape pair is
  read as well as seen ones: the shape/centre CNN sees only a colour-blind
  silhouette (each pixel's distance from the background colour, the image's
  per-channel median), and the colour head sees only single pixels (a per-pixel
  MLP averaged over each cell), so it cannot learn shape. `contrast` [B]
  multiplies the silhouette (training augmentation: colours differ in contrast).
  """
  config: ShapesRewardConfig = ShapesRewardConfig()

  @nn.compact
  def __call__(self, images: jax.Array, contrast: jax.Array | None = None
               ) -> dict[str, jax.Array]:
    c = self.config
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"reward images must be [B, H, W, 3], got {images.shape}")
    b = images.shape[0]
    x = images.astype(jnp.float32)
    if x.shape[1:3] != (IMAGE_SIDE, IMAGE_SIDE):
      x = jax.image.resize(x, (b, IMAGE_SIDE, IMAGE_SIDE, 3), "linear")
    bg = jnp.median(x.reshape(b, -1, 3), axis=1)                               # [B, 3]
    background = nn.Dense(NUM_BACKGROUNDS)(
        (jnp.concatenate([bg, x.mean((1, 2))], -1) - BACKGROUND_CENTER) * BACKGROUND_SCALE)
    diff = x - bg[:, None, None]
    silhouette = jnp.sqrt(jnp.sum(diff * diff, -1, keepdims=True) + 1e-6)     # [B, H, W, 1]
    if contrast is not None:
      silhouette = silhouette * contrast[:, None, None, None]
    h = silhouette
    for w in c.widths:
      h = nn.gelu(nn.Conv(w, (3, 3), strides=2)(h))
    for _ in range(2):  # widen the receptive field to a whole object at the 8x8 grid
      h = h + nn.gelu(nn.Conv(c.widths[-1], (3, 3))(h))
    h = nn.gelu(nn.Conv(c.head_width, (1, 1))(h))
    cell = IMAGE_SIDE // GRID
    p = nn.gelu(nn.Dense(c.head_width)(jnp.concatenate([x, diff], -1)))       # per pixel
    p = nn.avg_pool(p, (cell, cell), strides=(cell, cell))
    return {"center": nn.Conv(1, (1, 1))(h)[..., 0],
            "color": nn.Dense(NUM_COLORS)(p),
            "shape": nn.Conv(NUM_SHAPES, (1, 1))(h),
            "background": background}


def _cauchy(x: jax.Array, target: jax.Array) -> jax.Array:
  return 1.0 / (1.0 + ((x - target) / COUNT_SCALE) ** 2)


def agreement(logits: dict[str, jax.Array], codes: jax.Array, mask: jax.Array) -> jax.Array:
  """Differentiable agreement in [0, 1] between scene logits and encoded captions.

  Args:
    logits: `SceneEncoder` output for B images.
    codes: int32 [B, shapes_text.CODE_LEN]; mask: float32 [B, MAX_CLAIMS] (`encode`).
  Returns:
    [B]: product of the claim agreements (counts, total, background, relation).
  """
  b = codes.shape[0]
  p_obj = jax.nn.sigmoid(logits["center"]).reshape(b, -1)                    # [B, G]
  p_col = jax.nn.softmax(logits["color"]).reshape(b, -1, NUM_COLORS)         # [B, G, 6]
  p_shape = jax.nn.softmax(logits["shape"]).reshape(b, -1, NUM_SHAPES)       # [B, G, 4]
  claims = codes[:, :3 * shapes_text.MAX_CLAIMS].reshape(b, shapes_text.MAX_CLAIMS, 3)
  total, background, relation, rel_a, rel_b = (codes[:, -5 + i] for i in range(5))
  col_sel = jax.nn.one_hot(claims[..., 0], NUM_COLORS + 1)
  col_sel = col_sel[..., :NUM_COLORS] + col_sel[..., NUM_COLORS:]            # any colour: all
  shape_sel = jax.nn.one_hot(claims[..., 1], NUM_SHAPES)                     # [B, K, 4]
  match = (jnp.einsum("bgc,bkc->bkg", p_col, col_sel)
           * jnp.einsum("bgs,bks->bkg", p_shape, shape_sel)) * p_obj[:, None]  # [B, K, G]
  counts = match.sum(-1)
  mask = mask.astype(jnp.float32)
  score = jnp.prod(jnp.where(mask > 0, _cauchy(counts, claims[..., 2]), 1.0), axis=1)
  score = score * _cauchy(p_obj.sum(-1), total)
  score = score * jnp.take_along_axis(jax.nn.softmax(logits["background"]),
                                      background[:, None], 1)[:, 0]
  # Soft centroids (fractions of the image side) of every claim.
  centers = (jnp.arange(GRID, dtype=jnp.float32) + 0.5) / GRID
  gx = jnp.tile(centers, GRID)
  gy = jnp.repeat(centers, GRID)
  weight = match / (counts[..., None] + 1e-6)
  cx, cy = weight @ gx, weight @ gy                                          # [B, K]
  pick = lambda v, k: jnp.take_along_axis(v, k[:, None], 1)[:, 0]
  dx = pick(cx, rel_a) - pick(cx, rel_b)
  dy = pick(cy, rel_a) - pick(cy, rel_b)
  offset = jnp.stack([-dx, dx, -dy, dy], -1)  # shapes.RELATIONS order: left, right, above, below
  offset = jnp.take_along_axis(offset, jnp.maximum(relation - 1, 0)[:, None], 1)[:, 0]
  rel_score = jax.nn.sigmoid((offset - RELATION_MARGIN) / RELATION_TEMP)
  return score * jnp.where(relation > 0, rel_score, 1.0)


def save_weights(path: str, params: Any, config: ShapesRewardConfig,
                 metrics: dict[str, float] | None = None) -> None:
  """Writes params as float16 safetensors with the config (and metrics) in the metadata."""
  flat = {"/".join(k): np.asarray(v, np.float16)
          for k, v in traverse_util.flatten_dict(jax.device_get(params)).items()}
  meta = {"config": json.dumps(dataclasses.asdict(config)), "metrics": json.dumps(metrics or {})}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  st_numpy.save_file(flat, path, metadata=meta)


def load_weights(path: str = WEIGHTS_PATH) -> tuple[ShapesRewardConfig, Any, dict]:
  """(config, float32 params, training metrics) from a file written by `save_weights`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"shapes reward weights not found: {path} (train them with "
                            f"python -m dreamlite_jax.rewards.train_shapes_reward)")
  from safetensors import safe_open
  with safe_open(path, framework="numpy") as f:
    meta = f.metadata() or {}
  if "config" not in meta:
    raise ValueError(f"{path}: no 'config' in the safetensors metadata; not a shapes reward file")
  raw = json.loads(meta["config"])
  try:
    config = ShapesRewardConfig(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in raw.items()})
  except TypeError as e:
    raise ValueError(f"{path}: config {raw} is not a ShapesRewardConfig ({e})") from e
  flat = st_numpy.load_file(path)
  params = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v, jnp.float32)
                                         for k, v in flat.items()})
  expected = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  if jax.tree.structure(params) != jax.tree.structure(expected):
    raise ValueError(f"{path}: parameter tree does not match SceneEncoder({config})")
  for (kp, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(expected)):
    if a.shape != b.shape:
      raise ValueError(f"{path}: {jax.tree_util.keystr(kp)} has shape {a.shape}, expected {b.shape}")
  return config, params, json.loads(meta.get("metrics", "{}"))


def init_params(config: ShapesRewardConfig, rng: jax.Array) -> Any:
  return SceneEncoder(config).init(rng, jnp.zeros((1, IMAGE_SIDE, IMAGE_SIDE, 3)))["params"]


def score_fn(config: ShapesRewardConfig):
  """`f(params, images [B, H, W, 3] in [-1, 1], codes, mask) -> [B]` agreement."""
  model = SceneEncoder(config)
  return lambda params, images, codes, mask: agreement(
      model.apply({"params": params}, images), codes, mask)


class LearnedShapesReward(image_text.ImageTextReward):
  """The reward interface over the learned scene encoder.

  `reward(images, prompts, source_images=None) -> [B]` (numpy, in [0, 1]) takes
  images as uint8 [B, H, W, 3] or floats in [-1, 1] and captions (for edits, the
  caption of the wanted result, e.g. `shapes_text.scene_caption(target)`;
  `source_images` is unused). `differentiable(images, codes, mask)` is the jax
  function ReFL differentiates; `tokenize` turns captions into its inputs.
  """
  def __init__(self, path: str = WEIGHTS_PATH):
    self.config, self.params, self.metrics = load_weights(path)
    self._apply = score_fn(self.config)

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(codes int32 [B, CODE_LEN], mask float32 [B, MAX_CLAIMS]) = `shapes_text.encode`."""
    return shapes_text.encode(prompts)

  def differentiable(self, images: jax.Array, codes: jax.Array, mask: jax.Array) -> jax.Array:
    """Reward [B] in [0, 1] of images [B, H, W, 3] in [-1, 1]; differentiable in `images`."""
    return self._apply(self.params, images, codes, mask)
