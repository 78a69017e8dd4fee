"""Qwen3-VL language stack in Flax: the frozen LLM whose hidden states condition the U-Net.

transformers has no Flax Qwen3-VL, so this is our own port, checked against
`transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLTextModel`. The module
returns the output of the last decoder layer, before the final RMSNorm, unless
`final_norm=True`. The DreamLite reference pipeline reads `hidden_states[-1]`,
which transformers (>= 4.55, every version with Qwen3-VL) ties to the output
AFTER the final norm; `Qwen3VLConfig.final_norm` picks which one is used. The LM
head is never part of this module.

The text-only forward is converted to TFLite, so it stays delegate-friendly:
every tensor has rank <= 4, RoPE tables are trace-time constants for text-only
positions, grouped-query attention folds the query heads of a K/V group into the
query length (`[B, kv, g*L, d] @ [B, kv, d, L]`, no K/V repeat), and the only
gather is the embedding lookup, which is exposed separately (`embed`) so a
converter can run it outside the graph and call `forward_embeddings`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dreamlite_jax.models.layers import Dense, RMSNorm

Dtype = Any
VOCAB, EMBED, HEADS, KV, MLP = "vocab", "embed", "heads", "kv", "mlp"
MASK_VALUE = -1e9  # additive bias for masked keys; scores are computed in float32


@dataclasses.dataclass(frozen=True)
class Qwen3TextConfig:
  """Sizes of the Qwen3-VL language model (transformers' `Qwen3VLTextConfig`)."""
  vocab_size: int = 151936
  hidden_size: int = 2048
  intermediate_size: int = 6144
  num_layers: int = 28
  num_heads: int = 16
  num_kv_heads: int = 8
  head_dim: int = 128
  rms_norm_eps: float = 1e-6
  rope_theta: float = 5_000_000.0
  mrope_section: tuple[int, int, int] = (24, 20, 20)
  attention_bias: bool = False

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"Qwen3TextConfig: num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2 or sum(self.mrope_section) != self.head_dim // 2:
      raise ValueError(f"Qwen3TextConfig: mrope_section {self.mrope_section} must sum to "
                       f"head_dim/2 = {self.head_dim // 2}")

  @classmethod
  def qwen3_vl_2b(cls) -> "Qwen3TextConfig":
    """Qwen3-VL-2B-Instruct (a checkpoint's config.json, via `from_hf_config`, wins)."""
    return cls()

  @classmethod
  def tiny(cls) -> "Qwen3TextConfig":
    """A 3-layer model with the real vocabulary, for CPU tests and the shapes default."""
    return cls(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, num_kv_heads=2,
               head_dim=16, mrope_section=(2, 3, 3))

  @classmethod
  def from_hf_config(cls, cfg: Mapping[str, Any]) -> "Qwen3TextConfig":
    """Reads a transformers config dict: the full Qwen3-VL one (with `text_config`) or the text one."""
    cfg = dict(cfg.get("text_config", cfg))
    def get(key):
      if key not in cfg:
        raise ValueError(f"Qwen3-VL text config: missing field {key!r}")
      return cfg[key]
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
      raise ValueError("Qwen3-VL text config: missing field 'rope_parameters.rope_theta'")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
      raise ValueError(f"Qwen3-VL text config: rope_type {rope_type!r} is not supported (only 'default')")
    if rope.get("mrope_interleaved", True) is not True:
      raise ValueError("Qwen3-VL text config: only interleaved M-RoPE (mrope_interleaved=true) is supported")
    head_dim = cfg.get("head_dim") or get("hidden_size") // get("num_attention_heads")
    return cls(
        vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
        intermediate_size=get("intermediate_size"), num_layers=get("num_hidden_layers"),
        num_heads=get("num_attention_heads"),
        num_kv_heads=cfg.get("num_key_value_heads") or get("num_attention_heads"),
        head_dim=head_dim, rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
        mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),
        attention_bias=bool(cfg.get("attention_bias", False)))


def mrope_axis_selector(head_dim: int, mrope_section: tuple[int, int, int]) -> np.ndarray:
  """`[3, head_dim/2]` one-hot: which position axis (t, h, w) drives each frequency.

  Interleaved M-RoPE: frequency j uses h when j % 3 == 1 and j < 3*sec[1], w when
  j % 3 == 2 and j < 3*sec[2], and t otherwise.
  """
  half = head_dim // 2
  sel = np.zeros((3, half), np.float32)
  axis = np.zeros(half, np.int64)
  for a, offset in ((1, 1), (2, 2)):
    axis[offset:mrope_section[a] * 3:3] = a
  sel[axis, np.arange(half)] = 1.0
  return sel


def rope_cos_sin(position_ids, config: Qwen3TextConfig):
  """Rotary tables from M-RoPE positions `[3, B, L]` -> (cos, sin) each `[B, L, 1, head_dim]`.

  Works on numpy (trace-time constants) and on jax arrays. The axis selection is a
  one-hot contraction, so no gather appears.
  """
  xp = np if isinstance(position_ids, np.ndarray) else jnp
  d = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
  weights = (mrope_axis_selector(d, config.mrope_section) * inv_freq[None, :]).astype(np.float32)
  # [3, B, L] x [3, d/2] -> [B, L, d/2]; per frequency only one of the 3 terms is non-zero.
  angles = xp.einsum("abl,aj->blj", position_ids.astype(xp.float32), weights)
  angles = xp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  return xp.cos(angles), xp.sin(angles)


def text_position_ids(batch: int, length: int) -> np.ndarray:
  """Text-only positions `[3, B, L]`: 0..L-1 on all three axes (what transformers uses)."""
  return np.broadcast_to(np.arange(length, dtype=np.int32), (3, batch, length)).copy()


def _rotate_half(x):
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def causal_bias(mask, groups: int):
  """Additive attention bias `[B, 1, g*L, L]` from a key mask `[B, L]` (1 = real token).

  Query rows are ordered (group, position) to match the folded GQA layout. The
  causal part is a trace-time constant.
  """
  length = mask.shape[1]
  causal = np.tril(np.ones((length, length), np.float32))
  causal = np.tile((1.0 - causal) * MASK_VALUE, (groups, 1))[None, None]      # [1, 1, g*L, L]
  keys = (1.0 - mask.astype(jnp.float32)) * MASK_VALUE
  return jnp.asarray(causal) + keys[:, None, None, :]


class GroupedQueryAttention(nn.Module):
  """Causal GQA with per-head q/k RMSNorm and RoPE; rank <= 4 throughout."""
  config: Qwen3TextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, bias):
    """x `[B, L, C]`, cos/sin `[B|1, L, 1, d]`, bias `[B, 1, g*L, L]` -> `[B, L, C]`."""
    cfg = self.config
    b, n, _ = x.shape
    h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dense = lambda f, name, axes: Dense(f, use_bias=cfg.attention_bias, axes=axes, dtype=self.dtype,
                                        param_dtype=self.param_dtype, name=name)
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                                name=name)
    q = norm("q_norm")(dense(h * d, "q_proj", (EMBED, HEADS))(x).reshape(b, n, h, d))
    k = norm("k_norm")(dense(kv * d, "k_proj", (EMBED, KV))(x).reshape(b, n, kv, d))
    v = dense(kv * d, "v_proj", (EMBED, KV))(x).reshape(b, n, kv, d)
    cos, sin = cos.astype(self.dtype), sin.astype(self.dtype)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    # Head h = kv_index * g + group_index, so [B, H, L, d] -> [B, kv, g*L, d] keeps groups together.
    q = (q * (d ** -0.5)).transpose(0, 2, 1, 3).reshape(b, kv, (h // kv) * n, d)
    k = k.transpose(0, 2, 3, 1)                                                # [B, kv, d, L]
    v = v.transpose(0, 2, 1, 3)                                                # [B, kv, L, d]
    scores = jnp.matmul(q, k).astype(jnp.float32) + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.matmul(probs, v)                                                 # [B, kv, g*L, d]
    out = out.reshape(b, h, n, d).transpose(0, 2, 1, 3).reshape(b, n, h * d)
    return dense(cfg.hidden_size, "o_proj", (HEADS, EMBED))(out)


class SwiGLU(nn.Module):
  """`down(silu(gate(x)) * up(x))`, no biases."""
  config: Qwen3TextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dense = lambda f, name, axes: Dense(f, use_bias=False, axes=axes, dtype=self.dtype,
                                        param_dtype=self.param_dtype, name=name)
    gate = dense(cfg.intermediate_size, "gate_proj", (EMBED, MLP))(x)
    up = dense(cfg.intermediate_size, "up_proj", (EMBED, MLP))(x)
    return dense(cfg.hidden_size, "down_proj", (MLP, EMBED))(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
  """Pre-norm block: `h += attn(norm(h))`, `h += mlp(norm(h))`."""
  config: Qwen3TextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, bias):
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(x)
    x = x + GroupedQueryAttention(cfg, name="self_attn", **kw)(h, cos, sin, bias)
    h = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
    return x + SwiGLU(cfg, name="mlp", **kw)(h)


class Qwen3TextModel(nn.Module):
  """The Qwen3-VL language model without the LM head.

  Methods: `embed(ids)`, `forward_embeddings(embeds, mask, position_ids, deepstack)`,
  and `__call__(ids, mask)` = both. `final_norm` adds the final RMSNorm (param `norm`).
  """
  config: Qwen3TextConfig
  final_norm: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.embed_tokens = self.param(
        "embed_tokens", nn.with_logical_partitioning(nn.initializers.normal(0.02), (VOCAB, EMBED)),
        (cfg.vocab_size, cfg.hidden_size), self.param_dtype)
    self.layers = [DecoderLayer(cfg, dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{i}")
                   for i in range(cfg.num_layers)]
    if self.final_norm:
      self.norm = RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)

  def embed(self, ids):
    """Token ids `[B, L]` int32 -> embeddings `[B, L, hidden]` (the only gather)."""
    return jnp.take(self.embed_tokens, ids, axis=0).astype(self.dtype)

  def forward_embeddings(self, embeds, mask, position_ids=None, deepstack=None):
    """Runs the decoder layers.

    Args:
      embeds: `[B, L, hidden]` input embeddings.
      mask: `[B, L]` 1 on real tokens, 0 on (right) padding.
      position_ids: optional M-RoPE positions `[3, B, L]` int32; None means text-only
        positions 0..L-1, baked in as constants.
      deepstack: optional `[K, B, L, hidden]` visual features (zero off the image
        tokens) added to the output of decoder layers 0..K-1.
    Returns:
      `[B, L, hidden]` output of the last decoder layer (after the final norm if `final_norm`).
    """
    b, n, _ = embeds.shape
    if position_ids is None:
      cos, sin = rope_cos_sin(text_position_ids(1, n), self.config)
    else:
      cos, sin = rope_cos_sin(position_ids, self.config)
    groups = self.config.num_heads // self.config.num_kv_heads
    bias = causal_bias(mask, groups)
    x = embeds.astype(self.dtype)
    for i, layer in enumerate(self.layers):
      x = layer(x, cos, sin, bias)
      if deepstack is not None and i < deepstack.shape[0]:
        x = x + deepstack[i].astype(self.dtype)
    return self.norm(x) if self.final_norm else x

  def __call__(self, ids, mask):
    """Text-only forward: ids `[B, L]`, mask `[B, L]` -> hidden states `[B, L, hidden]`."""
    return self.forward_embeddings(self.embed(ids), mask)
