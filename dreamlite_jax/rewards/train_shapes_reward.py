"""Trains the learned shapes reward on generator data and reports held-out AUC.

Positives are (image, its caption) from the shapes generator: T2I images with
their GenEval-style captions and edit targets with `scene_caption`. Every
positive comes with a negative of one of three kinds: the caption with one fact
changed (`perturb_caption`), a render that contradicts the caption
(`shapes_eval.corrupt_t2i`), or another example's image. Images get pixel
noise and blur so the model also accepts the soft samples of a tiny diffusion
model. AUC (matched vs mismatched) is measured on fresh examples from the
evaluation seed, both on held-in (colour, shape) pairs and on the held-out split.

    python -m dreamlite_jax.rewards.train_shapes_reward --steps 1500 \
        --out dreamlite_jax/rewards/weights/shapes_reward.safetensors
"""
from __future__ import annotations

import argparse
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import ndimage, stats

from data_pipelines import shapes
from dreamlite_jax.eval import shapes_eval
from dreamlite_jax.rewards import learned_shapes
from dreamlite_jax.rewards import shapes_text

T2I_FRACTION = 0.6


def _example(split: str, seed: int, index: int, rng: np.random.Generator,
             size: int) -> dict:
  """{"image" uint8, "caption", "metadata" (T2I only, for corrupted renders)}."""
  if rng.random() < T2I_FRACTION:
    cats = shapes.HELDOUT_T2I_CATEGORIES if split == "heldout" else shapes.T2I_CATEGORIES
    ex = shapes.make_t2i_example(split, cats[index % len(cats)], seed, index, size)
    return {"image": ex["image"], "caption": ex["caption"], "metadata": ex["metadata"]}
  types = shapes.HELDOUT_EDIT_TYPES if split == "heldout" else shapes.EDIT_TYPES
  ex = shapes.make_edit_example(split, types[index % len(types)], seed, index, size)
  return {"image": ex["target"], "caption": shapes_text.scene_caption(ex["metadata"]["target"]),
          "metadata": None}


def make_pairs(split: str, seed: int, count: int, size: int = 64, augment: bool = True,
               start: int = 0) -> tuple[np.ndarray, list[str], np.ndarray]:
  """`count` matched and `count` mismatched pairs.

  Returns:
    (images float32 [2 * count, size, size, 3] in [-1, 1], captions, labels [2 * count]).
  """
  rng = np.random.default_rng([seed, start, 7])
  pool = [_example(split, seed, start + i, rng, size) for i in range(count)]
  images, captions, labels = [], [], []
  for i, ex in enumerate(pool):
    images.append(ex["image"]); captions.append(ex["caption"]); labels.append(1.0)
    kind = rng.integers(3)
    if kind == 1 and ex["metadata"] is not None:
      images.append(shapes_eval.corrupt_t2i(ex["metadata"], rng)); captions.append(ex["caption"])
    elif kind == 2:
      other = pool[(i + 1 + int(rng.integers(count - 1))) % count]
      images.append(other["image"]); captions.append(ex["caption"])
    else:
      images.append(ex["image"]); captions.append(shapes_text.perturb_caption(ex["caption"], rng))
    labels.append(0.0)
  x = np.stack(images).astype(np.float32)
  if augment:
    x = _augment(x, rng)
  return x / 127.5 - 1.0, captions, np.asarray(labels, np.float32)


def _augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Blur (sigma up to 1.2 px) and Gaussian pixel noise (sigma up to 25) per image."""
  out = np.empty_like(x)
  for i in range(len(x)):
    blur = rng.uniform(0.0, 1.2)
    im = ndimage.gaussian_filter(x[i], (blur, blur, 0)) if blur > 0.3 else x[i]
    out[i] = np.clip(im + rng.normal(0, rng.uniform(0, 25), im.shape), 0, 255)
  return out


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Area under the ROC curve (Mann-Whitney U over ranks; ties count half)."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0.5
  pos, neg = labels.sum(), (~labels).sum()
  if pos == 0 or neg == 0:
    raise ValueError("AUC needs both positive and negative labels")
  ranks = stats.rankdata(scores)
  return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def evaluate(score_fn, count: int = 300, size: int = 64) -> dict[str, float]:
  """AUC of `score_fn(images, captions) -> [N]` on fresh held-in and held-out pairs."""
  out = {}
  for split in shapes.SPLITS:
    x, captions, labels = make_pairs(split, shapes.EVAL_SEED, count, size, augment=True)
    scores = np.concatenate([np.asarray(score_fn(x[i:i + 200], captions[i:i + 200]))
                             for i in range(0, len(x), 200)])
    out[f"auc_{split}"] = auc(scores, labels)
  return out


def train(steps: int = 1500, batch: int = 64, lr: float = 1e-3, seed: int = 0,
          pool_size: int = 6000, log_every: int = 100,
          config: learned_shapes.ShapesRewardConfig = learned_shapes.ShapesRewardConfig()
          ) -> tuple[object, dict[str, float]]:
  """Trains from scratch; returns (params, metrics with final loss and held-out AUCs)."""
  model = learned_shapes.ShapesRewardModel(config)
  params = learned_shapes.init_params(config, jax.random.PRNGKey(seed))
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps, lr * 0.05),
                               weight_decay=1e-4))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, ids, mask, labels):
    def loss_fn(p):
      logits = model.apply({"params": p}, x, ids, mask)
      return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  start = time.perf_counter()
  x_pool, cap_pool, lab_pool = make_pairs("train", seed, pool_size // 2)
  ids_pool, mask_pool = shapes_text.tokenize(cap_pool, config.max_words)
  print(f"data: {len(x_pool)} pairs in {time.perf_counter() - start:.1f}s")
  rng = np.random.default_rng(seed)
  losses = []
  for i in range(steps):
    idx = rng.integers(0, len(x_pool), batch)
    # No flip augmentation: "left of" must keep its meaning.
    params, opt_state, loss = step(params, opt_state, x_pool[idx], ids_pool[idx], mask_pool[idx],
                                   lab_pool[idx])
    losses.append(float(loss))
    if (i + 1) % log_every == 0:
      print(f"step {i + 1}: loss {np.mean(losses[-log_every:]):.4f} "
            f"({time.perf_counter() - start:.0f}s)", flush=True)
  score = jax.jit(lambda x, ids, m: model.apply({"params": params}, x, ids, m))
  metrics = evaluate(lambda x, c: score(x, *shapes_text.tokenize(c, config.max_words)))
  metrics["final_loss"] = float(np.mean(losses[-log_every:]))
  metrics["steps"] = steps
  return params, metrics


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--pool", type=int, default=6000, help="training pairs generated up front")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=learned_shapes.WEIGHTS_PATH)
  args = parser.parse_args(argv)
  config = learned_shapes.ShapesRewardConfig()
  params, metrics = train(args.steps, args.batch, args.lr, args.seed, args.pool, config=config)
  learned_shapes.save_weights(args.out, params, config, metrics)
  for name, value in metrics.items():
    print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
  print(f"wrote {args.out}")
  return metrics


if __name__ == "__main__":
  main()
