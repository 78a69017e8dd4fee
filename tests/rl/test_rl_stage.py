"""The rl stage runner on embedding caches (the paper-scale data source), on stand-in
models: cached prompts and features in, the configured reward (a tiny CLIP folder) out,
before/after recorded; config errors named before any rollout.

Runs on the 8 simulated devices of tests/conftest.py: the updates shard over the mesh.
"""
from __future__ import annotations

import json
import os
import re
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dreamlite_jax import pipeline as pipeline_lib
from dreamlite_jax.job import stages
from dreamlite_jax.config import ConfigError
from dreamlite_jax.rewards.registry import make_reward
from dreamlite_jax.training import checkpoints as ckpt
from dreamlite_jax.job import rl_stage
from dreamlite_jax.training import state as state_lib
from experiments import dreamlite_1024
from experiments import train_defaults

from cache_records import write_cache
from clip_fixture import write_tiny_clip
from stand_ins import StandInUNet, StandInVAE

SIZE, TEXT_LENGTH, TEXT_DIM = 32, 8, 16
CACHED_PROMPT = re.compile(r"(t2i|edit) \d+")  # cache_records' prompts


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Caches of 12 T2I and 12 edit records, a tiny CLIP folder, the SFT checkpoint."""
  root = tmp_path_factory.mktemp("rl_cache")
  for task in ("t2i", "edit"):
    write_cache(str(root / task), task, SIZE, 12, text_length=TEXT_LENGTH, text_dim=TEXT_DIM)
  unet, vae = StandInUNet(), StandInVAE()
  latent = SIZE // 8
  init = lambda rng: unet.init(rng, jnp.zeros((1, latent, 2 * latent, 4)), jnp.zeros((1,)),
                               jnp.zeros((1, TEXT_LENGTH, TEXT_DIM)),
                               jnp.ones((1, TEXT_LENGTH), jnp.int32), jnp.zeros((1, 2)))["params"]
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  manager = ckpt.make_manager(ckpt.checkpoint_dir(str(root / "sft")), async_save=False)
  ckpt.save(manager, state_lib.create_state(init, optax.adam(1e-3), mesh, seed=0), None, None)
  manager.wait_until_finished()
  manager.close()
  vae_params = vae.init(jax.random.PRNGKey(2), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
  # No text encoder (model.text_encoder.spec = ''): the cache path must not need one, and
  # no `image_size`: that is the shapes world's side.
  shared = pipeline_lib.Pipeline(None, unet, None, vae, vae_params, vae_scale=8, size_multiple=8)
  models = types.SimpleNamespace(
      unet=unet, vae=vae, vae_params=vae_params, text_encoder=None,
      vae_config=types.SimpleNamespace(downsample_factor=8),
      unet_config=types.SimpleNamespace(encoder_hid_dim=TEXT_DIM),
      pipeline=shared.with_unet_params)
  return {"root": root, "clip": write_tiny_clip(str(root / "clip")), "models": models}


def _ctx(world, tmp_path, method="nft", **reward) -> stages.StageContext:
  section = dreamlite_1024.rl_section()
  section.update(method=method, iterations=2, prompts_per_iteration=2,
                 num_minibatches=1, checkpoint_every=1)
  section.grpo.group_size = 2
  section.nft.update(group_size=2, noise_draws=2)
  # The preset's sampler is Flow-GRPO's; DiffusionNFT's uses dual guidance.
  section.sampler.update(steps=2, image_guidance=1.0 if method == "nft" else 0.0)
  section.data.size = SIZE
  section.reward.update({"path": world["clip"], **reward})
  section.eval.update(count=4, batch_size=4, seed=0,
                      sampler=dict(steps=2, guidance=3.5, image_guidance=1.0))
  section.train = train_defaults.train_config(steps=4, batch_size=8, lr=1e-3, warmup_steps=0,
                                              ema_decay=0.0, log_every=1, checkpoint_every=1,
                                              async_checkpoints=False, progress_bar=False)
  root = world["root"]
  config = ml_collections.ConfigDict(dict(
      seed=0, mesh=train_defaults.mesh_config(data=-1, fsdp=1, tensor=1),
      model=dict(text_encoder=dict(spec="", text_length=TEXT_LENGTH)),
      data=dict(source="cache", t2i_cache=str(root / "t2i"), edit_cache=str(root / "edit"),
                num_threads=1, prefetch=2)))
  config.rl = section
  os.makedirs(tmp_path / "rl", exist_ok=True)
  return stages.StageContext(config=config, name="rl", workdir=str(tmp_path / "rl"),
                             job_workdir=str(tmp_path), parent_workdir=str(root / "sft"),
                             parent_results={}, models=world["models"])


@pytest.fixture
def reward_calls(monkeypatch):
  """Every call of the reward the stage builds: (name, path) it was built from, and
  per call the prompts, image shape, source images and rewards."""
  calls = {"built": [], "calls": []}

  class Recording:
    def __init__(self, inner):
      self.inner = inner

    def __call__(self, images, prompts, source_images=None):
      out = self.inner(images, prompts, source_images)
      calls["calls"].append({"prompts": list(prompts), "shape": np.shape(images),
                             "sources": np.asarray(source_images), "rewards": np.asarray(out)})
      return out

    def __getattr__(self, name):
      return getattr(self.inner, name)

  def build(name, path=""):
    calls["built"].append((name, path))
    return Recording(make_reward(name, path))

  monkeypatch.setattr(rl_stage, "make_reward", build)
  return calls


@pytest.mark.parametrize("method", ["nft", "flow_grpo"])
def test_online_rl_draws_cached_prompts_and_scores_them_with_the_configured_reward(
    world, tmp_path, reward_calls, method):
  ctx = _ctx(world, tmp_path, method)
  results = rl_stage.run_stage(ctx)
  assert reward_calls["built"] == [("clip", world["clip"])]
  calls = reward_calls["calls"]
  assert len(calls) == 4  # before, 2 iterations, after
  before, train, after = calls[0], calls[1:3], calls[3]
  # Before and after: the same fixed cached prompts, T2I and edit.
  assert before["prompts"] == after["prompts"] and len(before["prompts"]) == 4
  # Each iteration: 2 new cached prompts, each G = 2 times, rewarded on decoded images.
  drawn = [c["prompts"][::2] for c in train]
  for c, prompts in zip(train, drawn):
    assert c["prompts"] == [p for p in prompts for _ in range(2)] and c["shape"] == (4, SIZE, SIZE, 3)
  assert drawn[0] != drawn[1]
  every = [p for c in calls for p in c["prompts"]]
  assert all(CACHED_PROMPT.fullmatch(p) for p in every), every
  assert {p.split()[0] for p in every} == {"t2i", "edit"}
  # Edits are rewarded with their decoded source image, T2I rows with none.
  for c in calls:
    edit = np.array([p.startswith("edit") for p in c["prompts"]])
    assert (np.abs(c["sources"][~edit].astype(int)).sum((1, 2, 3)) == 0).all()
    assert (c["sources"][edit].astype(int).sum((1, 2, 3)) > 0).all()
  # The recorded figures are those rewards.
  rl = results["rl"]
  assert rl["method"] == method and rl["reward"] == f"clip ({world['clip']})"
  assert rl["before"] == pytest.approx(before["rewards"].mean(), rel=1e-5)
  assert rl["after"] == pytest.approx(after["rewards"].mean(), rel=1e-5)
  assert rl["train_reward_first"] == pytest.approx(train[0]["rewards"].mean(), rel=1e-5)
  assert results["steps"] == 2
  with open(os.path.join(ctx.workdir, "scores.json")) as f:
    assert json.load(f)["rl"] == rl
  for grid in results["sample_grids"]:
    assert os.path.getsize(os.path.join(ctx.workdir, grid)) > 0


@pytest.mark.parametrize("reward,match", [
    (dict(name="no_such_reward"), r"config\.rl\.reward \(name='no_such_reward'.*unknown reward"),
    (dict(name="clip", path="/no/such/clip"), r"config\.rl\.reward \(name='clip', "
                                              r"path='/no/such/clip'\)"),
    (dict(name="shapes"), r"config\.rl\.reward .*shapes metadata"),
])
def test_a_bad_reward_fails_naming_it_before_any_rollout(world, tmp_path, monkeypatch, reward,
                                                         match):
  ctx = _ctx(world, tmp_path, **reward)
  monkeypatch.setattr(ctx, "models", types.SimpleNamespace())  # any model use fails
  with pytest.raises(ConfigError, match=match):
    rl_stage.run_stage(ctx)
  assert os.listdir(ctx.workdir) == []


def test_method_is_required_and_checked(world, tmp_path):
  ctx = _ctx(world, tmp_path)
  del ctx.config.rl["method"]
  with pytest.raises(ConfigError, match=r"config\.rl\.method is required"):
    rl_stage.run_stage(ctx)
  ctx.config.rl.method = "ppo"
  with pytest.raises(ConfigError, match=r"config\.rl\.method = 'ppo'"):
    rl_stage.run_stage(ctx)
