"""Counts U-Net parameters of a config without allocating them (`jax.eval_shape`).

  python -m benchmarks.param_count --config experiments/dreamlite_1024_pretrain_t2i.py

Prints `unet_params: N`, a per-level breakdown, and the reference count of the
released DreamLite U-Net (389,968,388) for comparison.
"""
from __future__ import annotations

import argparse
import collections

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from dreamlite_jax.config import load_config
from dreamlite_jax.models import weights
from dreamlite_jax.models.unet import UNetConfig

RELEASED_UNET_PARAMS = 389_968_388


def breakdown(abstract_params) -> dict[str, int]:
  """Parameter count per top-level module (`down_blocks_0`, `mid_block`, ...)."""
  counts = collections.OrderedDict()
  for path, leaf in traverse_util.flatten_dict(nn.unbox(abstract_params)).items():
    counts[path[0]] = counts.get(path[0], 0) + int(np.prod(leaf.shape))
  return counts


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True)
  args, overrides = parser.parse_known_args(argv)
  config = load_config(args.config, overrides)
  unet_config = UNetConfig.from_dict(config.model.unet)
  abstract = weights.unet_abstract_params(unet_config)
  for name, n in breakdown(abstract).items():
    print(f"{name}: {n}")
  total = weights.count_params(abstract)
  print(f"released_dreamlite_unet_params: {RELEASED_UNET_PARAMS}")
  print(f"matches_release: {total == RELEASED_UNET_PARAMS}")
  print(f"unet_params: {total}")


if __name__ == "__main__":
  jax.config.update("jax_platforms", "cpu")
  main()
