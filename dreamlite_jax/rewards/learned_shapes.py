"""A small learned image-text reward for the shapes world, differentiable in the image.

The programmatic evaluator is exact but not differentiable, and ReFL needs a
reward gradient with respect to the pixels. This model scores how well an image
[B, H, W, 3] in [-1, 1] matches a caption (word ids from `shapes_text`): a small
CNN turns the image (resized to 64x64; 4x4 patches, then a stride-2 and a
plain 3x3 convolution) into an 8x8 grid of features with a
learned 2-D position embedding, a two-layer transformer reads the caption, then
a joint transformer over [cls | words | grid] lets text and image tokens attend
to each other (so "left of" and "red circle and blue
square" can be told apart), and an MLP on the cls token gives one logit; the reward is its
sigmoid in [0, 1]. Trained by `python -m dreamlite_jax.rewards.train_shapes_reward`,
whose weights ship as `weights/shapes_reward.safetensors` (about 1 MB).
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

from dreamlite_jax.rewards import shapes_text

WEIGHTS_PATH = os.path.join(os.path.dirname(__file__), "weights", "shapes_reward.safetensors")
IMAGE_SIDE = 64


@dataclasses.dataclass(frozen=True)
class ShapesRewardConfig:
  width: int = 64
  heads: int = 4
  text_layers: int = 2
  cross_layers: int = 2
  vocab_size: int = shapes_text.VOCAB_SIZE
  max_words: int = shapes_text.MAX_WORDS


class _Block(nn.Module):
  """Pre-LN transformer block; `context` None = self-attention."""
  width: int
  heads: int

  @nn.compact
  def __call__(self, x, mask, context=None, context_mask=None):
    h = nn.LayerNorm()(x)
    kv = h if context is None else context
    kv_mask = mask if context is None else context_mask
    attn_mask = nn.make_attention_mask(jnp.ones(x.shape[:2]), kv_mask)
    x = x + nn.MultiHeadDotProductAttention(self.heads)(h, kv, mask=attn_mask)
    h = nn.LayerNorm()(x)
    return x + nn.Dense(self.width)(nn.gelu(nn.Dense(2 * self.width)(h)))


class ShapesRewardModel(nn.Module):
  """`apply(vars, images [B, H, W, 3] in [-1, 1], ids [B, L], mask [B, L]) -> logits [B]`."""
  config: ShapesRewardConfig = ShapesRewardConfig()

  @nn.compact
  def __call__(self, images: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
    c = self.config
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"reward images must be [B, H, W, 3], got {images.shape}")
    b = images.shape[0]
    x = images.astype(jnp.float32)
    if x.shape[1:3] != (IMAGE_SIDE, IMAGE_SIDE):
      x = jax.image.resize(x, (b, IMAGE_SIDE, IMAGE_SIDE, 3), "linear")
    # 64 -> 16 (4x4 patches) -> 8: cheap enough to train on a shared laptop CPU.
    x = nn.gelu(nn.Conv(32, (4, 4), strides=4, padding="VALID")(x))
    x = nn.gelu(nn.Conv(c.width, (3, 3), strides=2)(x))
    x = nn.gelu(nn.Conv(c.width, (3, 3))(x))
    grid = x.reshape(b, -1, c.width)
    grid = grid + self.param("grid_pos", nn.initializers.normal(0.02), grid.shape[1:])
    grid_mask = jnp.ones(grid.shape[:2])

    mask = mask.astype(jnp.float32)
    t = nn.Embed(c.vocab_size, c.width)(ids)
    t = t + self.param("word_pos", nn.initializers.normal(0.02), (c.max_words, c.width))[
        :ids.shape[1]]
    for _ in range(c.text_layers):
      t = _Block(c.width, c.heads)(t, mask)
    # One joint sequence [cls | words | grid]: every layer mixes text and image.
    cls = jnp.broadcast_to(self.param("cls", nn.initializers.normal(0.02), (1, 1, c.width)),
                           (b, 1, c.width))
    x = jnp.concatenate([cls, t, grid], 1)
    x_mask = jnp.concatenate([jnp.ones((b, 1)), mask, grid_mask], 1)
    for _ in range(c.cross_layers):
      x = _Block(c.width, c.heads)(x, x_mask)
    pooled = nn.LayerNorm()(x[:, 0])
    return nn.Dense(1)(nn.gelu(nn.Dense(c.width)(pooled)))[:, 0]


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
  config = ShapesRewardConfig(**json.loads(meta["config"]))
  flat = st_numpy.load_file(path)
  params = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v, jnp.float32)
                                         for k, v in flat.items()})
  expected = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  got, want = jax.tree.structure(params), jax.tree.structure(expected)
  if got != want:
    raise ValueError(f"{path}: parameter tree does not match ShapesRewardModel({config})")
  for (kp, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(expected)):
    if a.shape != b.shape:
      raise ValueError(f"{path}: {jax.tree_util.keystr(kp)} has shape {a.shape}, expected {b.shape}")
  return config, params, json.loads(meta.get("metrics", "{}"))


def init_params(config: ShapesRewardConfig, rng: jax.Array) -> Any:
  ids = jnp.zeros((1, config.max_words), jnp.int32)
  return ShapesRewardModel(config).init(rng, jnp.zeros((1, IMAGE_SIDE, IMAGE_SIDE, 3)), ids,
                                        jnp.ones((1, config.max_words)))["params"]


class LearnedShapesReward:
  """The reward interface over the learned model.

  `reward(images, prompts, source_images=None) -> [B]` (numpy, in [0, 1]) takes
  images as uint8 [B, H, W, 3] or floats in [-1, 1] and prompt strings (for
  edits, the caption of the wanted result; `source_images` is unused: the
  model scores the result against its text). `differentiable(images, ids, mask)`
  is the jax function ReFL differentiates; `tokenize` turns prompts into its inputs.
  """
  differentiable_available = True

  def __init__(self, path: str = WEIGHTS_PATH):
    self.config, self.params, self.metrics = load_weights(path)
    self.model = ShapesRewardModel(self.config)
    self._score = jax.jit(self.differentiable)

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    return shapes_text.tokenize(prompts, self.config.max_words)

  def differentiable(self, images: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Reward [B] in [0, 1] of images [B, H, W, 3] in [-1, 1]; differentiable in `images`."""
    return jax.nn.sigmoid(self.model.apply({"params": self.params}, images, ids, mask))

  def __call__(self, images: Any, prompts: Sequence[str], source_images: Any = None) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype == np.uint8:
      images = images.astype(np.float32) / 127.5 - 1.0
    if len(prompts) != images.shape[0]:
      raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    ids, mask = self.tokenize(list(prompts))
    return np.asarray(self._score(jnp.asarray(images, jnp.float32), ids, mask))
