"""Delegate-safe building blocks shared by the U-Net, the VAE and the text encoder.

Every op here lowers to what the TFLite GPU delegate runs: tensors of rank <= 4,
no BROADCAST_TO / GATHER / SHAPE, means instead of large sums (fp16 overflows past
65504). The same code is trained and exported, so the trained graph is the
deployed graph. All layouts are NHWC / [B, N, C].

Every parameter carries logical axis names; `training/mesh.py` maps them to mesh
axes. Norm statistics are computed in float32 whatever the compute dtype.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Logical axis names used by parameters (mapped to mesh axes in training/mesh.py).
EMBED, MLP, HEADS, KV, NORM = "embed", "mlp", "heads", "kv", "norm"
CONV_SPATIAL = ("conv_height", "conv_width")

# The dtypes a config may name (`dtype`, `param_dtype`, `train.compute_dtype`).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
CONV_IN, CONV_OUT = "conv_in", "conv_out"


def _init(init_fn, axes):
  return nn.with_logical_partitioning(init_fn, axes)


class Dense(nn.Module):
  """Linear layer `[..., in] -> [..., features]` with logical axis names."""
  features: int
  use_bias: bool = True
  axes: tuple[str, str] = (EMBED, MLP)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", _init(nn.initializers.lecun_normal(), self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", _init(nn.initializers.zeros, (self.axes[1],)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


_conv_for_export = contextvars.ContextVar("conv_for_export", default=False)


@contextlib.contextmanager
def export_lowering() -> Iterator[None]:
  """Traces depthwise convs as one convolution op whatever the backend (used by the exporter).

  The converters wrap every JAX -> TFLite conversion in this, so the phone gets one
  DEPTHWISE_CONV_2D per depthwise conv. Outside it, XLA:CPU gets shifted sums (see
  `_depthwise_as_shifted_sums`); GPU and TPU always get the convolution op.
  """
  token = _conv_for_export.set(True)
  try:
    yield
  finally:
    _conv_for_export.reset(token)


def _depthwise_as_shifted_sums(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
  """Stride-1 depthwise conv `[B, H, W, C] * [k, k, 1, C]` as k*k shifted multiply-adds.

  Same sum as `lax.conv_general_dilated(feature_group_count=C)` (the tests check
  both lowerings agree), but XLA:CPU runs grouped convolutions at about 1 GFLOP/s:
  for the tiny U-Net this form made depthwise forward 55x and forward+backward
  12x faster, about half the tiny train step on a 2-core CPU.
  """
  k = kernel.shape[0]
  h, w = x.shape[1] + 2 * pad - k + 1, x.shape[2] + 2 * pad - k + 1
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = None
  for i in range(k):
    for j in range(k):
      term = xp[:, i:i + h, j:j + w, :] * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


class Conv(nn.Module):
  """2-D convolution on NHWC with 'SAME'-style symmetric padding.

  `depthwise=True` makes a per-channel conv (groups == channels, kernel `[k, k, 1, C]`).
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  use_bias: bool = True
  depthwise: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    in_ch = x.shape[-1]
    groups = in_ch if self.depthwise else 1
    if self.depthwise and self.features != in_ch:
      raise ValueError(f"depthwise conv needs features == input channels, got {self.features} vs {in_ch}")
    k = self.kernel_size
    kernel = self.param(
        "kernel", _init(nn.initializers.lecun_normal(), (*CONV_SPATIAL, CONV_IN, CONV_OUT)),
        (k, k, in_ch // groups, self.features), self.param_dtype)
    pad = (k - 1) // 2
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.depthwise and self.stride == 1 and not _conv_for_export.get() and (
        jax.default_backend() == "cpu"):
      y = _depthwise_as_shifted_sums(x, kernel, pad)
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel, window_strides=(self.stride, self.stride), padding=((pad, pad), (pad, pad)),
          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
    if self.use_bias:
      bias = self.param("bias", _init(nn.initializers.zeros, (CONV_OUT,)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class GroupNorm(nn.Module):
  """GroupNorm written on 4-D tensors: `[B, H, W, C]` -> `[B, H*W, G, C/G]`.

  flax's GroupNorm reshapes to 5-D and broadcasts; this version keeps rank 4 and
  uses mean-based statistics, so it converts to the GPU delegate and is fp16-safe.
  """
  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    g = self.num_groups
    if c % g:
      raise ValueError(f"GroupNorm: {c} channels are not divisible into {g} groups")

    def group_mean(v):  # [B, H, W, C] -> [B, 1, G, 1]; staged so no reduction exceeds max(H, W, C/G)
      v = jnp.mean(jnp.mean(v, axis=2, keepdims=True), axis=1, keepdims=True)
      return jnp.mean(v.reshape(b, 1, g, c // g), axis=3, keepdims=True)

    xf = x.astype(jnp.float32)
    centered = xf.reshape(b, h * w, g, c // g) - group_mean(xf)
    var = group_mean((centered * centered).reshape(b, h, w, c))
    y = (centered * jax.lax.rsqrt(var + self.epsilon)).reshape(b, h, w, c)
    scale = self.param("scale", _init(nn.initializers.ones, (NORM,)), (c,), self.param_dtype)
    bias = self.param("bias", _init(nn.initializers.zeros, (NORM,)), (c,), self.param_dtype)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis with mean-based variance (fp32 statistics)."""
  epsilon: float = 1e-5
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    centered = xf - mean
    var = jnp.mean(centered * centered, axis=-1, keepdims=True)
    y = centered * jax.lax.rsqrt(var + self.epsilon)
    scale = self.param("scale", _init(nn.initializers.ones, (NORM,)), (x.shape[-1],), self.param_dtype)
    y = y * scale.astype(jnp.float32)
    if self.use_bias:
      bias = self.param("bias", _init(nn.initializers.zeros, (NORM,)), (x.shape[-1],), self.param_dtype)
      y = y + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis: `x / sqrt(mean(x^2) + eps) * scale`."""
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    y = xf * jax.lax.rsqrt(var + self.epsilon)
    scale = self.param("scale", _init(nn.initializers.ones, (NORM,)), (x.shape[-1],), self.param_dtype)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def erf(x):
  """erf from exp and arithmetic (Abramowitz-Stegun 7.1.26, |error| < 1.5e-7).

  TFLite has no builtin Erf; this form runs on the GPU delegate and is what
  both training and the exported graph use for exact GELU.
  """
  a1, a2, a3, a4, a5, p = 0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429, 0.3275911
  ax = jnp.abs(x)
  t = 1.0 / (1.0 + p * ax)
  poly = ((((a5 * t + a4) * t + a3) * t + a2) * t + a1) * t
  y = 1.0 - poly * jnp.exp(-ax * ax)
  return jnp.where(x < 0, -y, y)


def gelu(x):
  """Exact (erf) GELU, matching torch.nn.GELU() to ~1e-7."""
  return 0.5 * x * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0):
  """Sinusoidal embedding of float timesteps `[B]` -> `[B, dim]` (diffusers layout)."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  # An outer product as a [B,1] @ [1,half] matmul: the broadcast MUL it replaces is
  # rejected by the GPU delegate once the converter can't fold it.
  args = jnp.matmul(t.astype(jnp.float32)[:, None], jnp.exp(exponent)[None, :],
                    precision=jax.lax.Precision.HIGHEST)
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def upsample_nearest_2x(x):
  """Nearest-neighbour 2x upsampling `[B, H, W, C]` -> `[B, 2H, 2W, C]`.

  Built from two CONCATENATION + RESHAPE pairs. `jax.image.resize(.., 'nearest')`
  lowers to GATHER and `jnp.repeat` to a rank-5 broadcast, neither of which the
  GPU delegate runs.
  """
  b, h, w, c = x.shape
  x = jnp.concatenate([x, x], axis=-1).reshape(b, h, 2 * w, c)
  return jnp.concatenate([x, x], axis=2).reshape(b, 2 * h, 2 * w, c)


class Upsample(nn.Module):
  """Nearest 2x upsampling followed by a 3x3 conv."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return Conv(self.features, 3, dtype=self.dtype, param_dtype=self.param_dtype,
                name="conv")(upsample_nearest_2x(x))


class Downsample(nn.Module):
  """3x3 stride-2 conv (padding 1) halving height and width."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return Conv(self.features, 3, stride=2, dtype=self.dtype, param_dtype=self.param_dtype,
                name="conv")(x)


def attention_bias_from_mask(mask, dtype=jnp.float32):
  """Key mask `[B, M]` (1 = keep) -> additive bias `[B, 1, 1, M]` of `(1 - m) * -10000`."""
  bias = (1.0 - mask.astype(jnp.float32)) * -10000.0
  return bias[:, None, None, :].astype(dtype)


class Attention(nn.Module):
  """Multi-head attention with grouped K/V heads, written as transposes + matmuls.

  Queries `[B, N, heads*64]` are grouped per K/V head and the heads of a group are
  folded into the query length: `[B, kv, g*N, d] @ [B, kv, d, M]`. With one K/V
  head (multi-query attention) this is `[B, 1, H*N, d]` and the single K/V head
  needs no broadcast; everything stays rank 4.
  """
  heads: int
  head_dim: int = 64
  kv_heads: int | None = None
  qk_norm: bool = True
  qk_norm_eps: float = 1e-5
  out_features: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None, bias=None):
    """x `[B, N, C]`, context `[B, M, Cc]` (self-attention if None), bias `[B, 1, 1, M]`."""
    kv_heads = self.kv_heads or self.heads
    if self.heads % kv_heads:
      raise ValueError(f"heads={self.heads} is not a multiple of kv_heads={kv_heads}")
    group = self.heads // kv_heads
    d = self.head_dim
    ctx = x if context is None else context
    b, n, _ = x.shape
    m = ctx.shape[1]
    dense = lambda f, name, bias_=False, axes=(EMBED, HEADS): Dense(
        f, use_bias=bias_, axes=axes, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    q = dense(self.heads * d, "to_q")(x).reshape(b, n, self.heads, d)
    k = dense(kv_heads * d, "to_k", axes=(EMBED, KV))(ctx).reshape(b, m, kv_heads, d)
    v = dense(kv_heads * d, "to_v", axes=(EMBED, KV))(ctx).reshape(b, m, kv_heads, d)
    if self.qk_norm:
      q = RMSNorm(self.qk_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm_q")(q)
      k = RMSNorm(self.qk_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm_k")(k)
    q = q.transpose(0, 2, 1, 3).reshape(b, kv_heads, group * n, d)      # heads folded into length
    k = k.transpose(0, 2, 3, 1)                                           # [B, kv, d, M]
    v = v.transpose(0, 2, 1, 3)                                           # [B, kv, M, d]
    scores = jnp.matmul(q, k) * (1.0 / math.sqrt(d))
    if bias is not None:
      scores = scores + bias.astype(scores.dtype)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.matmul(probs, v)                                            # [B, kv, g*N, d]
    out = out.reshape(b, self.heads, n, d).transpose(0, 2, 1, 3).reshape(b, n, self.heads * d)
    return dense(self.out_features or x.shape[-1], "to_out", bias_=True, axes=(HEADS, EMBED))(out)


class FeedForward(nn.Module):
  """GEGLU feed-forward: `Dense(2*inner)` -> `a * gelu(g)` -> `Dense(dim)`."""
  mult: float = 4.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    inner = int(dim * self.mult)
    h = Dense(2 * inner, axes=(EMBED, MLP), dtype=self.dtype, param_dtype=self.param_dtype,
              name="proj_in")(x)
    h = h[..., :inner] * gelu(h[..., inner:])
    return Dense(dim, axes=(MLP, EMBED), dtype=self.dtype, param_dtype=self.param_dtype,
                 name="proj_out")(h)


class TransformerBlock(nn.Module):
  """Pre-LN block: optional self-attention, cross-attention to text, GEGLU FFN.

  Without self-attention the stream is *replaced* by `LN1(h)` (not added): the
  released DreamLite weights were trained with this, and the reference keeps it.
  """
  heads: int
  head_dim: int = 64
  kv_heads: int | None = 1
  self_attention: bool = True
  ff_mult: float = 3.0
  norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, context, context_bias):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = lambda name: Attention(self.heads, self.head_dim, self.kv_heads, name=name, **kw)
    normed = LayerNorm(self.norm_eps, name="norm1", **kw)(h)
    h = h + attn("attn1")(normed) if self.self_attention else normed
    h = h + attn("attn2")(LayerNorm(self.norm_eps, name="norm2", **kw)(h), context, context_bias)
    return h + FeedForward(self.ff_mult, name="ff", **kw)(LayerNorm(self.norm_eps, name="norm3", **kw)(h))


class SpatialTransformer(nn.Module):
  """GroupNorm -> Linear in -> `depth` TransformerBlocks -> Linear out, plus residual."""
  heads: int
  depth: int = 1
  head_dim: int = 64
  kv_heads: int | None = 1
  self_attention: bool = True
  ff_mult: float = 3.0
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context, context_bias):
    b, hgt, wid, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inner = self.heads * self.head_dim
    h = GroupNorm(self.norm_groups, 1e-6, name="norm", **kw)(x).reshape(b, hgt * wid, c)
    h = Dense(inner, axes=(EMBED, HEADS), name="proj_in", **kw)(h)
    for i in range(self.depth):
      h = TransformerBlock(self.heads, self.head_dim, self.kv_heads, self.self_attention,
                           self.ff_mult, name=f"transformer_blocks_{i}", **kw)(h, context, context_bias)
    h = Dense(c, axes=(HEADS, EMBED), name="proj_out", **kw)(h)
    return h.reshape(b, hgt, wid, c) + x


class SeparableConv(nn.Module):
  """Depthwise 3x3 (no bias) then pointwise 1x1 (no bias) to `features` channels."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = Conv(x.shape[-1], 3, use_bias=False, depthwise=True, name="depthwise", **kw)(x)
    return Conv(self.features, 1, use_bias=False, name="pointwise", **kw)(x)


class ResBlock(nn.Module):
  """ResNet block conditioned on the time embedding.

  `separable=True` is DreamLite's mobile block: the first separable conv expands
  to 2*out channels, the time embedding is added there, the second contracts back.
  """
  features: int
  separable: bool = True
  norm_groups: int = 32
  norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mid = 2 * self.features if self.separable else self.features
    conv = (lambda f, name: SeparableConv(f, name=name, **kw)) if self.separable else (
        lambda f, name: Conv(f, 3, name=name, **kw))
    h = nn.silu(GroupNorm(self.norm_groups, self.norm_eps, name="norm1", **kw)(x))
    h = conv(mid, "conv1")(h)
    t = Dense(mid, axes=(EMBED, MLP), name="time_emb_proj", **kw)(nn.silu(temb))
    h = h + t[:, None, None, :]
    h = nn.silu(GroupNorm(self.norm_groups, self.norm_eps, name="norm2", **kw)(h))
    h = conv(self.features, "conv2")(h)
    if x.shape[-1] != self.features:
      x = Conv(self.features, 1, name="conv_shortcut", **kw)(x)
    return x + h


class MLPEmbedding(nn.Module):
  """Dense -> SiLU -> Dense, as diffusers' TimestepEmbedding."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.silu(Dense(self.features, axes=(EMBED, MLP), name="linear_1", **kw)(x))
    return Dense(self.features, axes=(MLP, EMBED), name="linear_2", **kw)(x)
