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
