"""Stand-in models shared by pipeline tests: tiny, fast to compile, same interfaces as the real ones."""
import flax.linen as nn
import jax
import jax.numpy as jnp


class StandInVAE(nn.Module):
  """An 8x "autoencoder" with TinyAutoencoder's encode/decode interface (patch mean + Dense)."""

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


class StandInUNet(nn.Module):
  """The U-Net call signature with a few layers that use every input; the named
  `mid_block` gives distillation's GAN head its features."""

  @nn.compact
  def __call__(self, sample, timestep, text, text_mask, time_ids):
    m = text_mask.astype(jnp.float32)[..., None]
    pooled = (text * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    h = nn.Conv(8, (3, 3))(sample)
    h = h + nn.Dense(8)(pooled)[:, None, None] + nn.Dense(8)(timestep[:, None] / 1000.0)[:, None, None]
    h = h + nn.Dense(8)(time_ids / 1024.0)[:, None, None]
    h = nn.Dense(8, name="mid_block")(nn.silu(h))
    return nn.Conv(4, (3, 3))(nn.silu(h))
