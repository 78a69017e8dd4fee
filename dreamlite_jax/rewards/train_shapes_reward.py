"""Trains the learned shapes reward's scene encoder on generator data; reports AUCs.

Supervision is the generator's own metadata: every training image (T2I renders
of the 'train' split, edit sources and targets) comes with its scene, which
gives per 8x8-grid cell whether an object's centre lies in it and that object's
colour and shape, and the background. Images get pixel noise and blur so the
encoder also reads the soft samples of a tiny diffusion model.

The reward is then judged as an image-text matcher: AUC of matched vs mismatched
(image, caption) pairs on fresh examples from the evaluation seed, on held-in
pairs and on the held-out split (unseen colour-shape pairs, which never appear
in training). Every positive comes with a negative of one of three kinds: the
caption with one fact changed (`perturb_caption`), a render that contradicts
the caption (`shapes_eval.corrupt_t2i`), or another example's image.

    python -m dreamlite_jax.rewards.train_shapes_reward --steps 1200 \
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


def scene_targets(scene: dict) -> dict[str, np.ndarray]:
  """Encoder targets of one scene: center float32 [8, 8], color / shape int32 [8, 8]
  (-1 where no object centre), background int32 []."""
  g, h, w = learned_shapes.GRID, scene["height"], scene["width"]
  center = np.zeros((g, g), np.float32)
  color = np.full((g, g), -1, np.int32)
  shape = np.full((g, g), -1, np.int32)
  colors, kinds = list(shapes.COLORS), list(shapes.SHAPES)
  for obj in scene["objects"]:
    cx, cy = obj["center"]
    i, j = min(int(cy * g / h), g - 1), min(int(cx * g / w), g - 1)
    center[i, j] = 1.0
    color[i, j], shape[i, j] = colors.index(obj["color"]), kinds.index(obj["shape"])
  return {"center": center, "color": color, "shape": shape,
          "background": np.int32(list(shapes.BACKGROUNDS).index(scene["background"]))}


def make_training_pool(count: int, seed: int, size: int = 64) -> dict[str, np.ndarray]:
  """`count` augmented 'train' split images [N, size, size, 3] in [-1, 1] with targets.

  Half T2I renders (all categories), half edit images (source or target, so every
  background and edit result appears)."""
  rng = np.random.default_rng([seed, 11])
  images, targets = [], []
  for i in range(count):
    if i % 2 == 0:
      ex = shapes.make_t2i_example("train", shapes.T2I_CATEGORIES[(i // 2) % 6], seed, i, size)
      image, scene = ex["image"], ex["metadata"]["scene"]
    else:
      ex = shapes.make_edit_example("train", shapes.EDIT_TYPES[(i // 2) % 7], seed, i, size)
      side = "target" if rng.random() < 0.5 else "source"
      image, scene = ex[side], ex["metadata"][side]
    images.append(image)
    targets.append(scene_targets(scene))
  x = _augment(np.stack(images).astype(np.float32), rng) / 127.5 - 1.0
  pool = {k: np.stack([t[k] for t in targets]) for k in targets[0]}
  pool["images"] = x.astype(np.float32)
  return pool


def encoder_loss(logits: dict, batch: dict) -> tuple[jax.Array, dict]:
  """BCE on centre cells + colour/shape CE at object cells + background CE."""
  center = jnp.mean(optax.sigmoid_binary_cross_entropy(logits["center"], batch["center"]))
  at_obj = (batch["color"] >= 0).astype(jnp.float32)
  n = jnp.maximum(at_obj.sum(), 1.0)
  ce = lambda lg, y: optax.softmax_cross_entropy_with_integer_labels(lg, jnp.maximum(y, 0))
  color = jnp.sum(ce(logits["color"], batch["color"]) * at_obj) / n
  shape = jnp.sum(ce(logits["shape"], batch["shape"]) * at_obj) / n
  background = jnp.mean(ce(logits["background"], batch["background"]))
  loss = 4.0 * center + color + shape + background
  return loss, {"center": center, "color": color, "shape": shape, "background": background}


def evaluate(score_fn, count: int = 300, size: int = 64, seed: int = shapes.EVAL_SEED
             ) -> dict[str, float]:
  """AUC of `score_fn(images, captions) -> [N]` on fresh held-in and held-out pairs."""
  out = {}
  for split in shapes.SPLITS:
    x, captions, labels = make_pairs(split, seed, count, size, augment=True)
    scores = np.concatenate([np.asarray(score_fn(x[i:i + 200], captions[i:i + 200]))
                             for i in range(0, len(x), 200)])
    out[f"auc_{split}"] = auc(scores, labels)
  return out


def train(steps: int = 600, batch: int = 32, lr: float = 3e-3, seed: int = 0,
          pool_size: int = 3000, log_every: int = 20, eval_count: int = 300,
          config: learned_shapes.ShapesRewardConfig = learned_shapes.ShapesRewardConfig()
          ) -> tuple[object, dict[str, float]]:
  """Trains the encoder from scratch; returns (params, metrics: final loss and AUCs)."""
  model = learned_shapes.SceneEncoder(config)
  params = learned_shapes.init_params(config, jax.random.PRNGKey(seed))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(
      optax.warmup_cosine_decay_schedule(0.0, lr, max(1, min(50, steps // 10)), steps, lr * 0.05)))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch, contrast):
    def loss_fn(p):
      return encoder_loss(model.apply({"params": p}, batch["images"], contrast), batch)
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  start = time.perf_counter()
  pool = make_training_pool(pool_size, seed)
  print(f"data: {pool_size} images in {time.perf_counter() - start:.1f}s", flush=True)
  rng = np.random.default_rng(seed)
  losses = []
  for i in range(steps):
    idx = rng.integers(0, pool_size, batch)
    # No flip augmentation: "left of" must keep its meaning.
    contrast = rng.uniform(0.5, 1.5, batch).astype(np.float32)  # silhouette contrast
    params, opt_state, loss = step(params, opt_state, {k: v[idx] for k, v in pool.items()},
                                   contrast)
    losses.append(float(loss))
    if (i + 1) % log_every == 0:
      print(f"step {i + 1}: loss {np.mean(losses[-log_every:]):.4f} "
            f"({time.perf_counter() - start:.0f}s)", flush=True)
  score = jax.jit(learned_shapes.score_fn(config))
  metrics = evaluate(lambda x, c: score(params, x, *shapes_text.encode(c)), eval_count)
  metrics["initial_loss"] = float(np.mean(losses[:log_every]))
  metrics["final_loss"] = float(np.mean(losses[-log_every:]))
  metrics["steps"] = steps
  return params, metrics


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--pool", type=int, default=3000, help="training images generated up front")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--eval-count", type=int, default=300, help="AUC pairs per split")
  parser.add_argument("--out", default=learned_shapes.WEIGHTS_PATH)
  args = parser.parse_args(argv)
  config = learned_shapes.ShapesRewardConfig()
  params, metrics = train(args.steps, args.batch, args.lr, args.seed, args.pool,
                          eval_count=args.eval_count, config=config)
  learned_shapes.save_weights(args.out, params, config, metrics)
  for name, value in metrics.items():
    print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
  print(f"wrote {args.out}")
  return metrics


if __name__ == "__main__":
  main()
