"""Flow math and schedules against diffusers' FlowMatchEulerDiscreteScheduler."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamlite_jax.diffusion import flow


def _diffusers_schedule(num_steps: int, height: int, width: int):
  """Sigmas/timesteps exactly as DreamLitePipeline computes them."""
  from diffusers import FlowMatchEulerDiscreteScheduler
  from diffusers.pipelines.dreamlite import pipeline_dreamlite as ref

  scheduler = FlowMatchEulerDiscreteScheduler(
      use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
      max_image_seq_len=4096, time_shift_type="exponential")
  seq_len = (height // 8) * (width // 8) // 4
  mu = ref.calculate_shift(seq_len, scheduler.config.base_image_seq_len,
                           scheduler.config.max_image_seq_len, scheduler.config.base_shift,
                           scheduler.config.max_shift)
  sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
  timesteps, _ = ref.retrieve_timesteps(scheduler, num_steps, "cpu", sigmas=sigmas, mu=mu)
  return mu, scheduler.sigmas.numpy(), timesteps.numpy()


@pytest.mark.parametrize("steps,height,width", [(28, 1024, 1024), (4, 1024, 1024),
                                                (28, 512, 512), (10, 768, 1344), (3, 64, 64)])
def test_schedule_matches_diffusers(steps, height, width):
  mu_ref, sigmas_ref, timesteps_ref = _diffusers_schedule(steps, height, width)
  assert flow.ShiftConfig().mu(height // 8, width // 8) == pytest.approx(mu_ref, abs=1e-12)
  sigmas = flow.schedule_for_size(steps, height, width)
  assert sigmas.shape == (steps + 1,) and sigmas.dtype == np.float32
  np.testing.assert_allclose(sigmas, sigmas_ref, rtol=0, atol=1e-7)
  np.testing.assert_allclose(flow.timesteps_from_sigmas(sigmas), timesteps_ref, rtol=0, atol=1e-4)


def test_paper_constants():
  assert flow.ShiftConfig().mu(128, 128) == pytest.approx(1.15)
  assert flow.ShiftConfig().mu(32, 32) == pytest.approx(0.5)  # 256 tokens
  timesteps = flow.timesteps_from_sigmas(flow.schedule_for_size(4, 1024, 1024))
  np.testing.assert_allclose(timesteps, [1000.0, 904.53, 759.51, 512.84], atol=0.006)


def test_fixed_shift_equals_sd3_formula():
  s = np.linspace(0.0, 1.0, 11).astype(np.float32)
  k = 3.0
  mu = flow.ShiftConfig(dynamic=False, shift=k).mu(64, 64)
  np.testing.assert_allclose(flow.shift_sigmas(s, mu), k * s / (1 + (k - 1) * s), atol=1e-6)
  np.testing.assert_allclose(np.asarray(flow.shift_sigmas(jnp.asarray(s), mu)),
                             k * s / (1 + (k - 1) * s), atol=1e-6)
  np.testing.assert_allclose(flow.ShiftConfig(dynamic=False).mu(8, 8), 0.0)


def test_noising_and_targets_are_consistent():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  x0 = jax.random.normal(k1, (3, 4, 4, 4))
  e = jax.random.normal(k2, (3, 4, 4, 4))
  sigma = jnp.array([0.0, 0.3, 1.0])
  xt = flow.add_noise(x0, e, sigma)
  np.testing.assert_allclose(xt[0], x0[0])
  np.testing.assert_allclose(xt[2], e[2])
  v = flow.velocity_target(x0, e)
  np.testing.assert_allclose(flow.predict_x0(xt, v, sigma), x0, atol=1e-6)
  np.testing.assert_allclose(flow.predict_noise(xt, v, sigma), e, atol=1e-6)
  # The target is the derivative of x_t along sigma.
  d = (flow.add_noise(x0, e, sigma + 1e-3) - flow.add_noise(x0, e, sigma - 1e-3)) / 2e-3
  np.testing.assert_allclose(d, v, atol=1e-3)
  with pytest.raises(ValueError, match="sigma has shape"):
    flow.add_noise(x0, e, jnp.ones(2))


def test_training_sigmas_distributions():
  rng = jax.random.PRNGKey(1)
  u = np.asarray(flow.sample_training_sigmas(rng, 20000, "uniform"))
  assert 0 <= u.min() and u.max() < 1
  assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
  ln = np.asarray(flow.sample_training_sigmas(rng, 20000, "logit_normal", 0.5, 0.8))
  logits = np.log(ln / (1 - ln))
  assert abs(logits.mean() - 0.5) < 0.02 and abs(logits.std() - 0.8) < 0.02
  shifted = np.asarray(flow.sample_training_sigmas(rng, 20000, "uniform", mu=1.15))
  np.testing.assert_allclose(shifted, flow.shift_sigmas(u, 1.15), atol=1e-6)
  assert shifted.mean() > u.mean() + 0.1
  with pytest.raises(ValueError, match="unknown timestep sampler"):
    flow.sample_training_sigmas(rng, 4, "cosine")
