"""Tiny random transformers Qwen3-VL models and helpers: the numerical references for our port."""
import os

import numpy as np
import torch
import transformers

# Small vocabulary: the image/vision token ids are moved inside it via the config.
VOCAB = 320
IMAGE_TOKEN, VISION_START, VISION_END, VIDEO_TOKEN = 300, 301, 302, 303


def tiny_hf_config() -> transformers.Qwen3VLConfig:
  text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
              rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[2, 3, 3],
                                   mrope_interleaved=True))
  vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                num_position_embeddings=64, deepstack_visual_indexes=[0, 1], patch_size=16,
                temporal_patch_size=2, spatial_merge_size=2)
  return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                                    video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                                    vision_end_token_id=VISION_END)


def randomize_(model: torch.nn.Module, seed: int):
  """Norm weights start at 1 and biases at 0; perturb them so a wrong mapping shows."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.2 * torch.randn(p.shape, generator=gen))


def last_layer_output(model, **inputs) -> tuple[np.ndarray, np.ndarray]:
  """(last decoder layer output before the final norm, last_hidden_state) of a transformers VL model."""
  captured = {}
  layer = model.model.language_model.layers[-1]
  handle = layer.register_forward_hook(lambda mod, args, out: captured.__setitem__("h", out))
  try:
    with torch.no_grad():
      out = model.model(**inputs, output_hidden_states=True)
  finally:
    handle.remove()
  assert torch.equal(out.hidden_states[-1], out.last_hidden_state)  # transformers ties [-1] to post-norm
  return captured["h"].numpy(), out.last_hidden_state.numpy()


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def write_checkpoint_dir(model, directory: str, **kwargs) -> str:
  os.makedirs(directory, exist_ok=True)
  model.save_pretrained(directory, **kwargs)
  return directory
