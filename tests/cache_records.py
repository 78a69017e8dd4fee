"""Writes small embedding caches in the on-disk format of `data_pipelines.build_cache`.

Records with fixed random latents and text features, so tests of what reads caches
(the loss batches, RL prompts, the distillation pool) need no VAE or text encoder.
"""
from __future__ import annotations

import json
import os

import numpy as np
from array_record.python import array_record_module
from flax import serialization

from data_pipelines import cache


def write_cache(root: str, task: str, side: int, n: int, *, vae_scale: int = 8,
                text_length: int = 8, text_dim: int = 16, channels: int = 4,
                seed: int = 0) -> str:
  """Writes `<root>/<side>/` with `n` records of `task` ("t2i" | "edit"); returns that dir.

  Record i's latents are filled with a value that identifies it (task, i), and its
  prompt is f"{task} {i}", so tests can tell which examples a batch holds.
  """
  rng = np.random.default_rng([seed, side, n, task == "edit"])
  h = side // vae_scale
  path = os.path.join(root, str(side))
  os.makedirs(path, exist_ok=True)
  shard = "cache-p00000-of-00001.array_record"
  writer = array_record_module.ArrayRecordWriter(os.path.join(path, shard), "group_size:1")
  features = {}
  for i in range(n):
    ident = (1000.0 if task == "edit" else 0.0) + i
    record = {
        "latents": np.full((h, h, channels), ident, np.float16),
        "text": rng.standard_normal((text_length, text_dim)).astype(np.float16),
        "text_mask": (np.arange(text_length) < 1 + i % text_length).astype(np.int32),
        "null_text": np.zeros((text_length, text_dim), np.float16),
        "null_text_mask": np.eye(1, text_length, dtype=np.int32)[0],
        "is_edit": np.float32(task == "edit"),
        "prompt": f"{task} {i}",
    }
    if task == "edit":
      record["source_latents"] = np.full((h, h, channels), -ident, np.float16)
    features = {k: ({"dtype": "str"} if isinstance(v, str) else
                    {"dtype": str(v.dtype), "shape": list(v.shape)}) for k, v in record.items()}
    writer.write(serialization.msgpack_serialize(record))
  writer.close()
  info = {"num_examples": n, "shards": [shard], "features": features, "size": [side, side],
          "task": task, "latent_channels": channels, "vae_scale": vae_scale,
          "text_length": text_length, "text_dim": text_dim, "kept": n, "skipped": {},
          "encoders": {"vae": "test", "text_encoder": "test"}}
  with open(os.path.join(path, cache.INFO_FILE), "w") as f:
    json.dump(info, f)
  return path
