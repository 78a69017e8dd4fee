"""The released DreamLite checkpoint (a diffusers folder) in every journey, at tiny sizes.

A complete random-weight DreamLite folder is written by diffusers and transformers
themselves (`DreamLitePipeline.save_pretrained` of a tiny `DreamLiteUNetModel`,
`AutoencoderTiny`, Qwen3-VL, the Qwen tokenizer files and the flow-matching scheduler),
then: generated from with `dreamlite_jax.pipeline` (the latents of `DreamLitePipeline`),
exported to TFLite (`converters.export --model`, both gates), fine-tuned from
(`init_from.model`: U-Net params and EMA from the folder, fresh optimiser) and
evaluated (`dreamlite_jax.eval --checkpoint`). A job's stage directory (a fake job with
its records) evaluates with no flag naming its VAE or text encoder.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file

from converters import export, gpu_check, numerics
from converters.tflite_pipeline import TFLitePipeline
from dreamlite_jax import model_ref
from dreamlite_jax import pipeline as pipeline_lib
from dreamlite_jax.config import ConfigError
from dreamlite_jax.diffusion import flow
from dreamlite_jax.eval import __main__ as eval_cli
from dreamlite_jax.models import weights
from dreamlite_jax.models.tokenizer import SPECIAL_TOKENS, qwen_tiktoken_path
from dreamlite_jax.models.unet import DreamLiteUNet, UNetConfig
from dreamlite_jax.models.vae import VAEConfig
from dreamlite_jax.training import checkpoints, pretrain_loss, trainer
from dreamlite_jax.training.state import TrainState
from experiments import train_defaults
import paper_fixtures
from tests.diffusion import dreamlite_reference as ref

SIZE = 64          # the folder's native size: unet sample_size 8 x the VAE's 8
PROMPT = "a red circle above a blue square"
ONE_DEVICE = jax.devices()[:1]  # the tests run with 8 simulated CPU devices


def write_release(root) -> str:
  """A tiny random DreamLite folder, written by `DreamLitePipeline.save_pretrained`."""
  from diffusers import AutoencoderTiny, DreamLitePipeline
  from transformers import Qwen2Tokenizer, Qwen3VLForConditionalGeneration
  from transformers.convert_slow_tokenizer import TikTokenConverter

  parts = os.path.join(str(root), "_parts")
  vae = AutoencoderTiny.from_pretrained(paper_fixtures.write_tiny_vae(os.path.join(parts, "vae")))
  text = Qwen3VLForConditionalGeneration.from_pretrained(
      paper_fixtures.write_tiny_text_encoder(os.path.join(parts, "text_encoder")))
  unet = ref.tiny_unet(seed=0, encoder_hid_dim=paper_fixtures.TEXT_HIDDEN)
  vocab_file = qwen_tiktoken_path()
  vocab, merges = TikTokenConverter(vocab_file).extract_vocab_merges_from_model(vocab_file)
  tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges,
                             additional_special_tokens=list(SPECIAL_TOKENS[1:]))
  pipe = DreamLitePipeline(text_encoder=text.eval(), tokenizer=tokenizer, processor=None,
                           vae=vae.eval(), unet=unet, scheduler=ref.dreamlite_scheduler())
  directory = os.path.join(str(root), "DreamLite")
  pipe.save_pretrained(directory, safe_serialization=True)
  shutil.rmtree(parts)
  return directory


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> str:
  return write_release(tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def jax_pipe(release):
  return pipeline_lib.load_pipeline(release)


def test_release_checkpoint_resolves_from_the_folder_alone(release):
  found = model_ref.resolve(release)
  assert found.kind == "diffusers" and found.image_size == SIZE
  assert found.vae_source == os.path.join(release, "vae")
  assert found.text_encoder_spec == os.path.join(release, "text_encoder")
  assert found.tokenizer == os.path.join(release, "tokenizer")
  assert found.shift == flow.ShiftConfig() and (found.steps, found.guidance) == (28, 3.5)
  assert found.unet()[0].encoder_hid_dim == paper_fixtures.TEXT_HIDDEN
  assert found.vae()[0].downsample_factor == 8
  assert found.notes == []  # a folder as diffusers writes it: nothing found that differs


def test_release_checkpoint_generate_matches_diffusers(release, jax_pipe):
  """Our pipeline on the folder = DreamLitePipeline on the folder (same noise): the same
  prompt templates, Qwen3-VL features, U-Net, scheduler shift and CFG."""
  from diffusers import DreamLitePipeline

  torch_pipe = DreamLitePipeline.from_pretrained(release, processor=None)
  torch_pipe.set_progress_bar_config(disable=True)
  seed, steps = 3, 12
  noise = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(seed))
  with ref._one_thread():
    want = torch_pipe(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=steps,
                      guidance_scale=3.5, generator=torch.Generator().manual_seed(seed),
                      output_type="latent").images.permute(0, 2, 3, 1).numpy()
  got = jax_pipe.generate(PROMPT, steps=steps, guidance=3.5, size=SIZE, output="latent",
                          noise=noise.permute(0, 2, 3, 1).numpy())
  scale = max(1.0, float(np.abs(want).max()))
  assert float(np.abs(got - want).max()) <= 1e-4 * scale
  assert np.abs(want - noise.permute(0, 2, 3, 1).numpy()).max() > 0.1  # the comparison has teeth
  other = jax_pipe.generate("a green triangle", steps=steps, guidance=3.5, size=SIZE,
                            output="latent", noise=noise.permute(0, 2, 3, 1).numpy())
  assert np.abs(other - want).max() > 1e-3  # the prompt reaches the latents


def test_release_checkpoint_exports_to_tflite(release, jax_pipe, tmp_path):
  out = tmp_path / "export"
  manifest = export.main(["--model", release, "--out", str(out), "--precision", "fp32",
                          "--size", str(SIZE)])
  assert set(manifest["models"]) == {"text_encoder", "vae_encoder", "vae_decoder", "unet"}
  for entry in manifest["models"].values():   # both gates passed for every file
    assert gpu_check.check_model(out / entry["file"]) == []
    assert entry["numerics"]["max_rel_err"] <= numerics.THRESHOLDS["fp32"]
  assert manifest["unet"]["time_ids"] == [SIZE, SIZE]
  assert manifest["text"]["tokenizer_file"]["file"] == "tokenizer.json"
  assert (out / "tokenizer.json").is_file() and (out / "text_embeddings.npy").is_file()
  app = TFLitePipeline(out)
  assert app.tokenizer.path == str(out / "tokenizer.json")
  image = app.generate(PROMPT, seed=0)
  assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8


def _sft_config(init_model: str, steps: int) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.train = train_defaults.train_config(
      steps=steps, batch_size=2, lr=1e-3, schedule="constant", warmup_steps=0, ema_decay=1.0,
      log_every=1, checkpoint_every=steps, progress_bar=False, async_checkpoints=False)
  config.mesh = train_defaults.mesh_config(data=-1, fsdp=1, tensor=1, max_replicated_fraction=1.0)
  config.init_from = train_defaults.init_from_config(model=init_model)
  return config


def _batches(text_dim: int, latent: int = SIZE // 8):
  rng = np.random.default_rng(0)
  while True:
    yield {"latents": rng.standard_normal((2, latent, latent, 4)).astype(np.float32),
           "text": rng.standard_normal((2, 8, text_dim)).astype(np.float32),
           "text_mask": np.ones((2, 8), np.float32)}


def test_release_checkpoint_sft_from_init_from_model(release, jax_pipe, tmp_path):
  """init_from.model = the folder: U-Net params and EMA from it, a fresh optimiser."""
  unet_config, folder_params = jax_pipe.unet.config, jax_pipe.unet_params
  model = DreamLiteUNet(unet_config)
  init_params = lambda rng: model.init(rng, *weights.unet_example_inputs(unet_config, 1, (4, 4)))["params"]
  loss_fn = pretrain_loss.make_pretrain_loss(pretrain_loss.unet_predict_fn(model))
  result = trainer.train(_sft_config(release, 2), str(tmp_path / "sft"), loss_fn,
                         _batches(unet_config.encoder_hid_dim), init_params, devices=ONE_DEVICE)
  assert "diffusers weights as params + EMA" in result.source
  assert result.start_step == 0 and int(result.state.step) == 2  # a fresh optimiser state
  # EMA decay 1: the EMA stays the folder's weights exactly; the params moved off them.
  for got, want in zip(jax.tree.leaves(result.state.ema_params), jax.tree.leaves(folder_params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  moved = [float(jnp.abs(a - b).max()) for a, b in
           zip(jax.tree.leaves(result.state.params), jax.tree.leaves(folder_params))]
  assert max(moved) > 0 and np.isfinite(result.history[-1]["loss"])

  # A stage whose U-Net differs from the folder's fails before compiling, naming the field.
  other = dataclasses.replace(unet_config, cross_attention_dim=2 * unet_config.cross_attention_dim)
  other_model = DreamLiteUNet(other)
  with pytest.raises(ConfigError, match=r"config\.init_from\.model = .*does not fit"):
    trainer.train(_sft_config(release, 1), str(tmp_path / "other"), loss_fn, _batches(64),
                  lambda rng: other_model.init(rng, *weights.unet_example_inputs(other, 1, (4, 4)))["params"],
                  devices=ONE_DEVICE)
  both = _sft_config(release, 1)
  both.init_from.workdir = str(tmp_path / "sft")
  with pytest.raises(ConfigError, match="both name the model to start from"):
    checkpoints.init_source(both)


def test_release_checkpoint_evaluates_shapes_at_its_size(release, tmp_path):
  scores = eval_cli.main(["--checkpoint", release, "--suite", "shapes", "--out", str(tmp_path),
                          "--per-category", "1", "--per-type", "1", "--steps", "2",
                          "--batch-size", "4"])
  assert {"t2i", "edit"} <= set(scores)
  written = json.loads((tmp_path / "scores.json").read_text())
  assert written == json.loads(json.dumps(scores))
  assert (tmp_path / "t2i.png").is_file() and (tmp_path / "edit.png").is_file()
  report = (tmp_path / "report.md").read_text()
  assert f"- size: {SIZE}" in report and "- model: diffusers" in report  # the folder's size


def test_release_checkpoint_loader_reports_what_differs(release, tmp_path):
  """fp16 / bf16 weights, no ff_mult, other scheduler settings, extra files: loaded, and
  each finding said once."""
  folder = tmp_path / "DreamLite"
  shutil.copytree(release, folder)
  unet_dir, vae_dir = folder / "unet", folder / "vae"
  cfg = json.loads((unet_dir / "config.json").read_text())
  del cfg["ff_mult"]
  (unet_dir / "config.json").write_text(json.dumps(cfg))
  state = torch_load_file(str(unet_dir / "diffusion_pytorch_model.safetensors"))
  torch_save_file({k: v.half() for k, v in state.items()},
                  str(unet_dir / "diffusion_pytorch_model.safetensors"))
  vae_state = torch_load_file(str(vae_dir / "diffusion_pytorch_model.safetensors"))
  torch_save_file({k: v.bfloat16() for k, v in vae_state.items()},
                  str(vae_dir / "diffusion_pytorch_model.safetensors"))
  sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
  sched["max_shift"] = 1.2
  del sched["base_shift"]
  (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
  (folder / "README.md").write_text("model card")
  index = json.loads((folder / "model_index.json").read_text())
  index["safety_checker"] = ["diffusers", "StableDiffusionSafetyChecker"]
  (folder / "model_index.json").write_text(json.dumps(index))

  found = model_ref.resolve(str(folder))
  unet_config, params = found.unet()
  vae_config, vae_params = found.vae()
  notes = "\n".join(found.notes)
  assert unet_config.ff_mult == 3.0
  assert "no ff_mult: assumed 3 (from the feed-forward weight shapes)" in notes
  assert f"{unet_dir}: weights stored as" in notes and "float16" in notes
  assert f"{vae_dir}: weights stored as" in notes and "bfloat16" in notes
  assert "no base_shift (assumed 0.5, the scheduler's default)" in notes
  assert found.shift.max_shift == 1.2 and "sigma shift" in notes
  assert "README.md" in notes and "'safety_checker'" in notes
  reference = pipeline_lib.load_pipeline(release, text_encoder="tiny:0")
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(reference.unet_params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-3, atol=1e-3)
  assert all(np.asarray(x).dtype == np.float32 for x in jax.tree.leaves(vae_params))

  (folder / "scheduler" / "scheduler_config.json").write_text(
      json.dumps({**sched, "time_shift_type": "linear"}))
  with pytest.raises(ValueError, match="time_shift_type='linear' is not supported"):
    model_ref.resolve(str(folder))


# ------------------------------------------------------------------ a job's stage directory

# Two U-Net levels (every block kind) over the tiny text encoder (`tiny:0`, hidden 64).
JOB_UNET = UNetConfig(block_out_channels=(16, 32), down_kinds=("cross", "full"),
                      up_kinds=("full", "none"), layers_per_block=1, transformer_depth=(1, 1),
                      mid_transformer_depth=1, heads=(1, 2), head_dim=16, norm_groups=8,
                      cross_attention_dim=32, encoder_hid_dim=64, time_embed_dim=32,
                      addition_time_embed_dim=8)
JOB_VAE = VAEConfig(encoder_channels=(8, 8, 8), decoder_channels=(8, 8, 8),
                    encoder_blocks=(1, 1, 1), decoder_blocks=(1, 1, 1))


def _save_run(workdir, params, config: dict) -> None:
  state = TrainState(step=jnp.array(5, jnp.int32), params=params, opt_state=(), ema_params=params,
                     rng=jax.random.PRNGKey(0), skipped=jnp.zeros((), jnp.int32))
  manager = checkpoints.make_manager(checkpoints.checkpoint_dir(str(workdir)), async_save=False)
  checkpoints.save(manager, state, None, ml_collections.ConfigDict(config))
  manager.wait_until_finished()
  manager.close()


def _random(abstract, seed):
  import flax.linen as nn
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape, np.float32)),
                      nn.unbox(abstract))


def write_fake_job(root) -> str:
  """A job workdir as `dreamlite_jax.main` leaves it after `vae` and `distill`: the job's
  config.json, each stage's DONE.json, the VAE run and the distilled student run (whose
  run config says model.vae_checkpoint = '': the job's own VAE stage)."""
  job = os.path.join(str(root), "demo")
  config = {"stages": "vae,distill", "seed": 0,
            "model": {"unet": dataclasses.asdict(JOB_UNET), "vae": dataclasses.asdict(JOB_VAE),
                      "vae_checkpoint": "", "conditioning": "spatial",
                      "text_encoder": {"spec": "tiny:0", "text_length": 16}},
            "data": {"source": "shapes", "image_size": 32},
            "vae": {"kind": "vae", "parent": ""},
            "distill": {"kind": "distill", "parent": "",
                        "objective": {"student_timesteps": [1000.0, 750.0, 500.0]}}}
  os.makedirs(job)
  with open(os.path.join(job, "config.json"), "w") as f:
    json.dump(config, f)
  _save_run(os.path.join(job, "vae"), _random(weights.vae_abstract_params(JOB_VAE), 1), config)
  student = os.path.join(job, "distill", "student")
  _save_run(student, _random(weights.unet_abstract_params(JOB_UNET), 2), config)
  for stage, results in (("vae", {"steps": 5}), ("distill", {"checkpoint": student})):
    with open(os.path.join(job, stage, "DONE.json"), "w") as f:
      json.dump({"stage": stage, "results": results, "run_id": stage}, f)
  return job


def test_release_checkpoint_job_stage_dir_needs_no_other_flag(tmp_path):
  job = write_fake_job(tmp_path)
  student = os.path.join(job, "distill", "student")
  found = model_ref.resolve(student)
  assert found.kind == "run" and found.job_workdir == job
  assert found.vae_source == os.path.join(job, "vae")
  assert found.text_encoder_spec == "tiny:0" and found.text_length == 16
  assert found.image_size == 32 and (found.steps, found.guidance) == (3, 0.0)
  scores = eval_cli.main(["--checkpoint", student, "--suite", "shapes",
                          "--out", str(tmp_path / "eval"), "--per-category", "1",
                          "--per-type", "1"])
  assert {"t2i", "edit"} <= set(scores)
  report = (tmp_path / "eval" / "report.md").read_text()
  assert "- steps: 3" in report and "- guidance: 0.0" in report
  # Without the job's records the VAE is not found, and the error says what to pass.
  os.remove(os.path.join(job, "config.json"))
  with pytest.raises(ValueError, match="--vae-checkpoint"):
    pipeline_lib.load_pipeline(student)
