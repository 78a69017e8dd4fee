"""CLIP in Flax: a ViT image tower and a causal text tower with projections.

The CLIP-style image-text reward needs a CLIP that runs (and differentiates)
inside our jitted training steps. The structure and parameter layout follow
transformers' `CLIPModel` (pre-LN encoder layers, class token, `pre_layrnorm`
before and `post_layernorm` after the vision encoder, the text pooled at the
first end-of-text token or, for legacy configs with `eos_token_id == 2`, at the
largest token id), so its weights load 1:1 (`clip_weights.py`), OpenCLIP files
through a name map. Parity with `transformers.CLIPModel` is tested.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTowerConfig:
  """One tower (text or vision); field names as in transformers' sub-configs."""
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  # text only
  vocab_size: int = 49408
  max_position_embeddings: int = 77
  eos_token_id: int = 49407
  # vision only
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"CLIP hidden_act {self.hidden_act!r} not supported "
                       f"(supported: {sorted(ACTIVATIONS)})")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"CLIP hidden_size {self.hidden_size} not divisible by "
                       f"num_attention_heads {self.num_attention_heads}")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  text: CLIPTowerConfig
  vision: CLIPTowerConfig
  projection_dim: int = 512

  @classmethod
  def from_transformers(cls, config: dict) -> "CLIPConfig":
    """From a transformers `CLIPModel` `config.json` dict."""
    for key in ("text_config", "vision_config"):
      if key not in config:
        raise ValueError(f"CLIP config.json has no {key!r}; is it a CLIPModel config?")
    names = {f.name for f in dataclasses.fields(CLIPTowerConfig)}

    def tower(d: dict, defaults: dict) -> CLIPTowerConfig:
      fields = dict(defaults, **{k: v for k, v in d.items() if k in names})
      for k in ("image_size", "patch_size"):
        if isinstance(fields.get(k), (list, tuple)):
          if len(set(fields[k])) != 1:
            raise ValueError(f"CLIP vision {k} {fields[k]} is not square")
          fields[k] = fields[k][0]
      if isinstance(fields.get("eos_token_id"), (list, tuple)):
        fields["eos_token_id"] = fields["eos_token_id"][0]
      return CLIPTowerConfig(**fields)

    text = tower(config["text_config"], dict(hidden_size=512, intermediate_size=2048,
                                             num_hidden_layers=12, num_attention_heads=8))
    vision = tower(config["vision_config"], dict(hidden_size=768, intermediate_size=3072,
                                                 num_hidden_layers=12, num_attention_heads=12))
    return cls(text=text, vision=vision, projection_dim=config.get("projection_dim", 512))


class _Attention(nn.Module):
  config: CLIPTowerConfig

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
    c = self.config
    b, n, d = x.shape
    h = c.num_attention_heads
    split = lambda t: t.reshape(b, n, h, d // h).transpose(0, 2, 1, 3)
    q = split(nn.Dense(d, name="q_proj")(x)) * (d // h) ** -0.5
    k = split(nn.Dense(d, name="k_proj")(x))
    v = split(nn.Dense(d, name="v_proj")(x))
    logits = q @ k.transpose(0, 1, 3, 2)
    if bias is not None:
      logits = logits + bias
    out = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype) @ v
    return nn.Dense(d, name="out_proj")(out.transpose(0, 2, 1, 3).reshape(b, n, d))


class _EncoderLayer(nn.Module):
  config: CLIPTowerConfig

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
    c = self.config
    x = x + _Attention(c, name="self_attn")(nn.LayerNorm(c.layer_norm_eps, name="layer_norm1")(x),
                                            bias)
    h = nn.LayerNorm(c.layer_norm_eps, name="layer_norm2")(x)
    h = nn.Dense(c.intermediate_size, name="fc1")(h)
    h = nn.Dense(c.hidden_size, name="fc2")(ACTIVATIONS[c.hidden_act](h))
    return x + h


class _Encoder(nn.Module):
  config: CLIPTowerConfig

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    for i in range(self.config.num_hidden_layers):
      x = _EncoderLayer(self.config, name=f"layers_{i}")(x, bias)
    return x


class CLIPVisionTower(nn.Module):
  """pixels [B, S, S, 3] (CLIP-normalised) -> pooled [B, hidden] (post-LN class token)."""
  config: CLIPTowerConfig

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    c = self.config
    if pixels.shape[1:] != (c.image_size, c.image_size, c.num_channels):
      raise ValueError(f"CLIP pixels must be [B, {c.image_size}, {c.image_size}, "
                       f"{c.num_channels}], got {pixels.shape}")
    p = c.patch_size
    x = nn.Conv(c.hidden_size, (p, p), strides=p, padding="VALID", use_bias=False,
                name="patch_embedding")(pixels)
    b = x.shape[0]
    x = x.reshape(b, -1, c.hidden_size)
    cls = self.param("class_embedding", nn.initializers.normal(1.0), (c.hidden_size,))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c.hidden_size)).astype(x.dtype), x], 1)
    pos = nn.Embed(x.shape[1], c.hidden_size, name="position_embedding").embedding
    x = x + pos[None]
    x = nn.LayerNorm(c.layer_norm_eps, name="pre_layrnorm")(x)
    x = _Encoder(c, name="encoder")(x)
    return nn.LayerNorm(c.layer_norm_eps, name="post_layernorm")(x[:, 0])


class CLIPTextTower(nn.Module):
  """ids [B, L] (+ mask [B, L]) -> pooled [B, hidden] at the end-of-text token."""
  config: CLIPTowerConfig

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    c = self.config
    b, n = ids.shape
    if n > c.max_position_embeddings:
      raise ValueError(f"CLIP text length {n} exceeds max_position_embeddings "
                       f"{c.max_position_embeddings}")
    x = nn.Embed(c.vocab_size, c.hidden_size, name="token_embedding")(ids)
    x = x + nn.Embed(c.max_position_embeddings, c.hidden_size,
                     name="position_embedding").embedding[None, :n]
    allowed = jnp.tril(jnp.ones((n, n), bool))[None, None]
    if mask is not None:
      allowed = allowed & (mask[:, None, None, :] > 0)
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    x = _Encoder(c, name="encoder")(x, bias)
    x = nn.LayerNorm(c.layer_norm_eps, name="final_layer_norm")(x)
    if c.eos_token_id == 2:  # legacy configs: the end-of-text token has the largest id
      where = jnp.argmax(ids, axis=-1)
    else:
      where = jnp.argmax(ids == c.eos_token_id, axis=-1)
    return x[jnp.arange(b), where]


class CLIP(nn.Module):
  """Both towers and their projections; `logit_scale` as in CLIPModel."""
  config: CLIPConfig

  def setup(self):
    c = self.config
    self.text_model = CLIPTextTower(c.text)
    self.vision_model = CLIPVisionTower(c.vision)
    self.text_projection = nn.Dense(c.projection_dim, use_bias=False)
    self.visual_projection = nn.Dense(c.projection_dim, use_bias=False)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(2.6592), ())

  def image_features(self, pixels: jax.Array) -> jax.Array:
    """Unnormalised image embeddings [B, projection_dim]."""
    return self.visual_projection(self.vision_model(pixels))

  def text_features(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Unnormalised text embeddings [B, projection_dim]."""
    return self.text_projection(self.text_model(ids, mask))

  def __call__(self, pixels: jax.Array, ids: jax.Array, mask: jax.Array | None = None
               ) -> jax.Array:
    """logits_per_image [B_img, B_text] = exp(logit_scale) * cosine similarity."""
    img = self.image_features(pixels)
    txt = self.text_features(ids, mask)
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
    return jnp.exp(self.logit_scale) * img @ txt.T


def init_params(config: CLIPConfig, rng: jax.Array) -> Any:
  s = config.vision.image_size
  return CLIP(config).init(rng, jnp.zeros((1, s, s, config.vision.num_channels)),
                           jnp.zeros((1, 4), jnp.int32))["params"]
