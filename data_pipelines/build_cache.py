"""`python -m data_pipelines.build_cache`: the embedding caches the paper-scale stages train on.

Reads image/caption pairs or edit triplets from a folder (captions.jsonl /
edits.jsonl, the layout of `t2i_folder` / `edit_triplets`) or a prepared TFDS
dataset, centre-crops every valid item to each side in `--resolutions`, and
stores per item the VAE latents of the crop (and of the edit source) and the
Qwen3-VL features of its caption / instruction plus the unconditional prompt's,
so pretraining never runs the 2B text encoder. The VAE loads from a diffusers
`AutoencoderTiny` folder, the text encoder from a transformers Qwen3-VL folder
(both safetensors only).

Usage:
  python -m data_pipelines.build_cache --folder /data/photos --out /data/cache/t2i \\
      --resolutions 512,1024 --vae /models/taesd --text-encoder /models/qwen3-vl-2b
  python -m data_pipelines.build_cache --tfds edit_triplets/r256_0123abcd --tfds-data-dir /data/tfds \\
      --out /data/cache/edit --resolutions 512 --vae /models/taesd --text-encoder /models/qwen3-vl-2b
  # on a pod, every host runs the same command, with its index or with --distributed
  # (jax.distributed.initialize() from the cluster environment supplies index and count):
  python -m data_pipelines.build_cache ... --process-index 3 --process-count 8
  python -m data_pipelines.build_cache ... --distributed

Output (read with `cache.CachedSource(<out>/<side>)`): one cache per side,
`<out>/<side>/`, whose records are
  latents float16 [side/f, side/f, C], source_latents (edit only) float16 [side/f, side/f, C],
  text float16 [L, D], text_mask int32 [L], null_text float16 [L, D], null_text_mask int32 [L],
  is_edit float32 [], prompt str
(f = the VAE's downsample factor, L = --text-length, D = the encoder's hidden size)
and whose `cache_info.json` holds num_examples, shards, features, size, task,
latent_channels, vae_scale, text_length, text_dim, kept, skipped {reason: count},
encoders and the skip examples. T2I text features do not depend on the side and
are encoded once per item; edit features do when the encoder has a vision tower
(it reads the source crop, as `Pipeline.edit` does).

Hosts: process i of P takes the items (non-blank manifest lines, or TFDS
records) i, i+P, i+2P, ..., validates them, and writes its own shards
`part-<i>-of-<P>-<k>.array_record`, each holding the kept items of one stretch
of its input (`--examples-per-shard` of them, the last one fewer). When a
process finishes it writes `build_state/process-<i>-of-<P>.done.json`; the
process that finds every process done (whichever finishes last) writes each
side's `cache_info.json`, so the cache is readable only once complete. No
process waits for another.

Resume: shards are written under a temporary name and renamed when complete,
and each completed stretch is recorded in `build_state/process-<i>-of-<P>/`.
Re-running the same command keeps the completed stretches (those whose shards
are all present) and continues after the last one. `build_state/args.json`
records the arguments that shape the output; a re-run with different ones is
refused, naming each difference.

Bad items are skipped and counted by reason (`manifests.SKIP_REASONS`, e.g.
`invalid_utf8` for captions that are not valid UTF-8); the counts are printed
at the end, in one line, and stored in `cache_info.json`. Mistakes in the
command itself (missing folder or weights, a side that is not a multiple of
the VAE's downsample factor, different arguments on resume) exit with status 2
and one line `error: ...`.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import functools
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tqdm

from data_pipelines import cache
from data_pipelines import images
from data_pipelines import manifests
from dreamlite_jax import pipeline
from dreamlite_jax.models import weights
from dreamlite_jax.models.vae import TinyAutoencoder, VAEConfig

MANIFESTS = {"t2i": "captions.jsonl", "edit": "edits.jsonl"}
# Arguments that shape the output: a resumed build must use the same ones.
RECORDED = ("source", "task", "resolutions", "vae", "text_encoder", "text_length", "min_side",
            "batch_size", "examples_per_shard", "process_count")


class BuildError(Exception):
  """A mistake in the command (paths, arguments): reported as one `error:` line."""


@dataclasses.dataclass(frozen=True)
class BuildArgs:
  """The parsed command; `source` is "folder:<abs path>" or "tfds:<name>@<data dir>:<split>"."""
  source: str
  task: str
  resolutions: tuple[int, ...]
  vae: str
  text_encoder: str
  text_length: int
  min_side: int
  batch_size: int
  examples_per_shard: int
  process_index: int
  process_count: int
  out: Path
  workers: int

  def recorded(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in RECORDED}


@dataclasses.dataclass
class Item:
  """A valid input item: its prompt and, per side, the uint8 centre crops (target, source or None)."""
  prompt: str
  crops: dict[int, tuple[np.ndarray, np.ndarray | None]]


Candidate = tuple[int, Callable[[], tuple[Item | None, manifests.SkipReport]]]


# ----------------------------------------------------------------------------- arguments


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):  # argparse would print usage and exit; one line instead
    raise BuildError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m data_pipelines.build_cache",
              description="Builds the embedding caches (VAE latents, Qwen3-VL features) "
                          "the paper-scale stages train on.",
              formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--folder",
                   help="folder holding captions.jsonl (T2I) or edits.jsonl (edit) and the images")
  src.add_argument("--tfds", metavar="NAME", help="prepared TFDS dataset (e.g. t2i_folder/r256_0123abcd)")
  p.add_argument("--tfds-data-dir", help="TFDS data dir of --tfds")
  p.add_argument("--tfds-split", default="train")
  p.add_argument("--out", required=True, help="cache root; one cache per side in <out>/<side>/")
  p.add_argument("--resolutions", required=True, help="comma-separated square sides, e.g. 512,1024")
  p.add_argument("--vae", required=True, help="diffusers AutoencoderTiny folder (safetensors)")
  p.add_argument("--text-encoder", required=True,
                 help="transformers Qwen3-VL folder (safetensors), or tiny:SEED for a random tiny one")
  p.add_argument("--text-length", type=int, default=128, help="text feature length L (default 128)")
  p.add_argument("--task", choices=("t2i", "edit"),
                 help="default: from the folder's manifest, or the TFDS features")
  p.add_argument("--min-side", type=int, default=64, help="skip images with a shorter side below this")
  p.add_argument("--batch-size", type=int, default=16, help="items per encoder call (static shape)")
  p.add_argument("--examples-per-shard", type=int, default=1024)
  p.add_argument("--process-index", type=int, help="default jax.process_index()")
  p.add_argument("--process-count", type=int, help="default jax.process_count()")
  p.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() first (cluster auto-detection: TPU pods, "
                      "SLURM, ...), so the defaults above are this host's index and the host count")
  p.add_argument("--workers", type=int, default=8, help="threads decoding and cropping images")
  return p


def _parse_resolutions(text: str) -> tuple[int, ...]:
  try:
    sides = tuple(int(s) for s in text.split(",") if s.strip())
  except ValueError:
    raise BuildError(f"--resolutions {text!r}: expected comma-separated integers, e.g. 512,1024") from None
  if not sides or any(s <= 0 for s in sides):
    raise BuildError(f"--resolutions {text!r}: expected positive sides, e.g. 512,1024")
  if len(set(sides)) != len(sides):
    raise BuildError(f"--resolutions {text!r}: a side is listed twice")
  return sides


def _detect_task(folder: Path, task: str | None) -> str:
  present = [t for t, name in MANIFESTS.items() if (folder / name).is_file()]
  if task is not None:
    if task not in present:
      raise BuildError(f"--folder {folder} has no {MANIFESTS[task]} (needed by --task {task})")
    return task
  if len(present) == 1:
    return present[0]
  if not present:
    raise BuildError(f"--folder {folder} has neither captions.jsonl (T2I) nor edits.jsonl (edit)")
  raise BuildError(f"--folder {folder} has both captions.jsonl and edits.jsonl: "
                   "pass --task t2i or --task edit")


def _text_encoder_spec(spec: str) -> str:
  if spec.startswith("tiny:"):
    return spec
  path = Path(spec)
  if not path.is_dir():
    raise BuildError(f"--text-encoder {spec}: no such directory")
  if not (path / "config.json").is_file():
    raise BuildError(f"--text-encoder {spec}: no config.json (expected a transformers Qwen3-VL folder)")
  return str(path.resolve())


def _vae_config(vae_dir: str) -> VAEConfig:
  path = Path(vae_dir)
  if not path.is_dir():
    raise BuildError(f"--vae {vae_dir}: no such directory")
  if not (path / "config.json").is_file():
    raise BuildError(f"--vae {vae_dir}: no config.json (expected a diffusers AutoencoderTiny folder)")
  try:
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("_class_name", "AutoencoderTiny") != "AutoencoderTiny":
      raise ValueError(f"config.json is a {cfg['_class_name']}, not an AutoencoderTiny")
    return VAEConfig.from_diffusers(cfg)
  except (ValueError, TypeError) as e:
    raise BuildError(f"--vae {vae_dir}: {e}") from None


def parse_args(argv: Sequence[str] | None) -> tuple[BuildArgs, VAEConfig, Any]:
  """Parses and checks the command; returns the args, the VAE config and the TFDS source (or None)."""
  a = _parser().parse_args(argv)
  sides = _parse_resolutions(a.resolutions)
  for name in ("text_length", "batch_size", "examples_per_shard", "workers"):
    if getattr(a, name) <= 0:
      raise BuildError(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
  if a.min_side < 1:
    raise BuildError(f"--min-side must be positive, got {a.min_side}")
  if a.distributed:
    jax.distributed.initialize()
  count = jax.process_count() if a.process_count is None else a.process_count
  index = jax.process_index() if a.process_index is None else a.process_index
  if count < 1 or not 0 <= index < count:
    raise BuildError(f"--process-index {index} must be in [0, --process-count {count})")
  tfds_source = None
  if a.folder is not None:
    folder = Path(a.folder)
    if not folder.is_dir():
      raise BuildError(f"--folder {a.folder}: no such directory")
    task = _detect_task(folder, a.task)
    source = f"folder:{folder.resolve()}"
  else:
    if not a.tfds_data_dir:
      raise BuildError("--tfds needs --tfds-data-dir (the directory the dataset was prepared into)")
    tfds_source, task = _open_tfds(a.tfds, a.tfds_data_dir, a.tfds_split, a.task)
    source = f"tfds:{a.tfds}@{Path(a.tfds_data_dir).resolve()}:{a.tfds_split}"
  vae_config = _vae_config(a.vae)
  f = vae_config.downsample_factor
  bad = [s for s in sides if s % f]
  if bad:
    raise BuildError(f"--resolutions: side(s) {bad} are not multiples of the VAE's downsample factor {f}")
  out = Path(a.out)
  if out.exists() and not out.is_dir():
    raise BuildError(f"--out {a.out} exists and is not a directory")
  args = BuildArgs(source=source, task=task, resolutions=sides, vae=str(Path(a.vae).resolve()),
                   text_encoder=_text_encoder_spec(a.text_encoder), text_length=a.text_length,
                   min_side=a.min_side, batch_size=a.batch_size,
                   examples_per_shard=a.examples_per_shard, process_index=index,
                   process_count=count, out=out, workers=a.workers)
  return args, vae_config, tfds_source


def _open_tfds(name: str, data_dir: str, split: str, task: str | None):
  """(random-access source, task) of a prepared TFDS dataset."""
  import tensorflow_datasets as tfds  # TensorFlow: only when --tfds is used

  if not Path(data_dir).is_dir():
    raise BuildError(f"--tfds-data-dir {data_dir}: no such directory")
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # TFDS raises many types for a name/dir/split it cannot open
    raise BuildError(f"--tfds {name} in {data_dir} (split {split!r}): "
                     f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
  keys = set(source.dataset_info.features.keys())
  found = "edit" if {"source", "target", "instruction"} <= keys else (
      "t2i" if {"image", "caption"} <= keys else None)
  if found is None:
    raise BuildError(f"--tfds {name}: features {sorted(keys)} hold neither image/caption (T2I) nor "
                     "source/target/instruction (edit)")
  if task is not None and task != found:
    raise BuildError(f"--tfds {name} holds {found} records, not {task}")
  # The folder builders count what they dropped while preparing; the cache info repeats it.
  report_path = Path(str(source.dataset_info.data_dir)) / "skip_report.json"
  source.prepare_report = json.loads(report_path.read_text()) if report_path.is_file() else None
  return source, found


# ----------------------------------------------------------------------------- items


def _crops(sides: Sequence[int], target: np.ndarray, source: np.ndarray | None):
  out = {}
  for side in sides:
    if source is None:
      (t,) = images.fit([target], (side, side), "center")
      out[side] = (t, None)
    else:
      t, s = images.fit([target, source], (side, side), "center")
      out[side] = (t, s)
  return out


def _folder_candidates(args: BuildArgs, start: int) -> tuple[int, Iterator[Candidate]]:
  root = Path(args.source.split(":", 1)[1])
  manifest = root / MANIFESTS[args.task]
  total = manifests.count_lines(manifest, args.process_index, args.process_count)
  fields = manifests.T2I_FIELDS if args.task == "t2i" else manifests.EDIT_FIELDS

  def check(where: str, line: bytes):
    report = manifests.SkipReport()
    record = manifests.decode_line(line, where, fields, report)
    if record is None:
      return None, report
    if args.task == "t2i":
      item = manifests.t2i_item(root, where, record, args.min_side, report)
      if item is None:
        return None, report
      return Item(item.caption, _crops(args.resolutions, item.image, None)), report
    item = manifests.edit_item(root, where, record, args.min_side, report)
    if item is None:
      return None, report
    return Item(item.instruction, _crops(args.resolutions, item.target, item.source)), report

  lines = manifests.iter_lines(manifest, args.process_index, args.process_count, start)
  return total, ((pos, functools.partial(check, where, line)) for pos, where, line in lines)


def _tfds_text(value: Any, where: str, report: manifests.SkipReport) -> str | None:
  if isinstance(value, (bytes, np.bytes_)):
    try:
      value = bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
      report.skip("invalid_utf8", where, f"byte {e.start}: {e.reason}")
      return None
  value = str(value).strip()
  if not value:
    report.skip("empty_caption", where)
    return None
  return value


def _tfds_image(value: Any, where: str, min_side: int, report: manifests.SkipReport):
  image = np.asarray(value)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    report.skip("undecodable_image", where, f"not uint8 [H, W, 3]: {image.dtype} {image.shape}")
    return None
  if min(image.shape[:2]) < min_side:
    report.skip("tiny_image", where, f"{image.shape[1]}x{image.shape[0]}, shorter side < {min_side}")
    return None
  return image


def _tfds_candidates(args: BuildArgs, source, start: int) -> tuple[int, Iterator[Candidate]]:
  indices = range(args.process_index, len(source), args.process_count)
  name = args.source.split(":", 1)[1].split("@", 1)[0]

  def check(index: int):
    report = manifests.SkipReport()
    where = f"{name}[{index}]"
    try:
      record = source[index]
    except Exception as e:  # a record TFDS cannot decode
      report.skip("undecodable_image", where, f"{type(e).__name__}: {e}")
      return None, report
    text = _tfds_text(record["caption" if args.task == "t2i" else "instruction"], where, report)
    if text is None:
      return None, report
    if args.task == "t2i":
      image = _tfds_image(record["image"], where, args.min_side, report)
      return (None if image is None else Item(text, _crops(args.resolutions, image, None))), report
    src = _tfds_image(record["source"], where, args.min_side, report)
    tgt = None if src is None else _tfds_image(record["target"], where, args.min_side, report)
    if tgt is None:
      return None, report
    if abs((src.shape[1] / src.shape[0]) / (tgt.shape[1] / tgt.shape[0]) - 1.0) > 0.05:
      report.skip("mismatched_pair", where, f"source {src.shape[1]}x{src.shape[0]} vs target "
                  f"{tgt.shape[1]}x{tgt.shape[0]}")
      return None, report
    return Item(text, _crops(args.resolutions, tgt, src)), report

  return len(indices), ((pos, functools.partial(check, indices[pos]))
                        for pos in range(start, len(indices)))


def _validated(candidates: Iterator[Candidate], workers: int):
  """Runs the checks on `workers` threads, yielding `(position, item, report)` in input order."""
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    window: collections.deque = collections.deque()
    for pos, check in candidates:
      window.append((pos, pool.submit(check)))
      if len(window) >= 4 * workers:
        p, fut = window.popleft()
        yield (p, *fut.result())
    while window:
      p, fut = window.popleft()
      yield (p, *fut.result())


# ----------------------------------------------------------------------------- encoding


def _vae_encode(model: TinyAutoencoder, params, x):
  return model.apply({"params": params}, x, method="encode")


class Encoder:
  """The VAE and the text encoder, called with one static batch shape per side."""

  def __init__(self, args: BuildArgs, vae_config: VAEConfig):
    try:
      _, self.vae_params = weights.load_vae_dir(args.vae)
    except (OSError, ValueError) as e:
      raise BuildError(f"--vae {args.vae}: {e}") from None
    try:
      self.text = pipeline.build_text_encoder(args.text_encoder, args.text_length)
    except (OSError, ValueError) as e:
      raise BuildError(f"--text-encoder {args.text_encoder}: {e}") from None
    self.vae_config = vae_config
    self.task, self.batch_size = args.task, args.batch_size
    self.vision = self.text.config.vision is not None
    self._vae = jax.jit(functools.partial(_vae_encode, TinyAutoencoder(vae_config)))
    self._null: tuple[np.ndarray, np.ndarray] | None = None

  @property
  def text_dim(self) -> int:
    return self.text.config.text.hidden_size

  def _null_text(self):
    if self._null is None:
      b = self.batch_size
      out = (self.text.encode_generate_unconditional(b) if self.task == "t2i" else
             self.text.encode_edit_unconditional(b))
      self._null = tuple(np.asarray(x) for x in out)
    return self._null

  def _latents(self, crops: list[np.ndarray]) -> np.ndarray:
    return _float16(self._vae(self.vae_params, images.to_unit_range(np.stack(crops))), "latents")

  def encode(self, batch: list[Item], sides: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
    """Records of `batch` per side; the batch is padded to `batch_size` with its last item."""
    n = len(batch)
    padded = batch + [batch[-1]] * (self.batch_size - n)
    prompts = [it.prompt for it in padded]
    shared = None
    if self.task == "t2i":
      shared = self.text.encode_generate(prompts), self._null_text()
    elif not self.vision:
      shared = self.text.encode_edit(prompts), self._null_text()
    out = {}
    for side in sides:
      fields = {"latents": self._latents([it.crops[side][0] for it in padded])}
      if self.task == "edit":
        sources = [it.crops[side][1] for it in padded]
        fields["source_latents"] = self._latents(sources)
      if shared is None:
        pixels = images.to_unit_range(np.stack(sources))
        text = self.text.encode_edit(prompts, pixels)
        null = self.text.encode_edit_unconditional(self.batch_size, pixels)
      else:
        text, null = shared
      fields["text"] = _float16(text[0], "text")
      fields["text_mask"] = np.asarray(text[1], np.int32)
      fields["null_text"] = _float16(null[0], "null_text")
      fields["null_text_mask"] = np.asarray(null[1], np.int32)
      is_edit = np.float32(self.task == "edit")
      out[side] = [{**{k: v[i] for k, v in fields.items()}, "is_edit": np.asarray(is_edit),
                    "prompt": batch[i].prompt} for i in range(n)]
    return out


def record_layout(task: str, side: int, vae_scale: int, latent_channels: int, text_length: int,
                  text_dim: int) -> dict[str, dict[str, Any]]:
  """`{key: {"dtype", "shape"}}` of every record of a cache at `side` (the spec's layout)."""
  h = side // vae_scale
  latent = {"dtype": "float16", "shape": [h, h, latent_channels]}
  text = {"dtype": "float16", "shape": [text_length, text_dim]}
  mask = {"dtype": "int32", "shape": [text_length]}
  out = {"latents": latent}
  if task == "edit":
    out["source_latents"] = latent
  out.update(text=text, text_mask=mask, null_text=text, null_text_mask=mask,
             is_edit={"dtype": "float32", "shape": []}, prompt={"dtype": "str"})
  return out


def _float16(x, name: str) -> np.ndarray:
  out = np.asarray(x, np.float32).astype(np.float16)
  if not np.isfinite(out).all():
    peak = float(np.abs(np.asarray(x, np.float32)).max())
    raise FloatingPointError(f"{name}: values beyond the float16 range (max |x| = {peak:.4g}); "
                             "the cache stores float16")
  return out


# ----------------------------------------------------------------------------- build state


def _state_dir(args: BuildArgs) -> Path:
  return args.out / cache.BUILD_DIR / f"process-{args.process_index:05d}-of-{args.process_count:05d}"


def _shard_name(args: BuildArgs, chunk: int) -> str:
  return f"part-{args.process_index:05d}-of-{args.process_count:05d}-{chunk:05d}.array_record"


def _args_record(args: BuildArgs) -> Path:
  return args.out / cache.BUILD_DIR / "args.json"


def _check_args_record(args: BuildArgs) -> None:
  """Refuses an --out that records different arguments, or holds something else."""
  record_path = _args_record(args)
  if record_path.is_file():
    saved = json.loads(record_path.read_text())
    diff = [f"{k}: recorded {saved.get(k)!r}, now {v!r}" for k, v in args.recorded().items()
            if saved.get(k) != v]
    if diff:
      raise BuildError(f"--out {args.out} holds a build with other arguments ({'; '.join(diff)}); "
                       "re-run with the recorded ones to resume, or choose another --out")
  elif args.out.is_dir() and any(p.name != cache.BUILD_DIR for p in args.out.iterdir()):
    raise BuildError(f"--out {args.out} is not empty and holds no build_cache record "
                     f"({cache.BUILD_DIR}/args.json); choose a new or empty directory")


def _write_args_record(args: BuildArgs) -> None:
  """Records the arguments (once the weights have loaded, so a typo does not pin them)."""
  record_path = _args_record(args)
  if not record_path.is_file():
    record_path.parent.mkdir(parents=True, exist_ok=True)
    cache.write_json_atomic(record_path, args.recorded())


def _finished_chunks(args: BuildArgs) -> list[dict[str, Any]]:
  """The leading chunks of this process whose record and shard files are all present.

  Anything after the first incomplete chunk (its record, temporary shards, the done
  marker) is removed: the build continues from there.
  """
  state = _state_dir(args)
  chunks = []
  while (path := state / f"chunk-{len(chunks):05d}.json").is_file():
    chunk = json.loads(path.read_text())
    if chunk["shard"] and not all((args.out / str(s) / chunk["shard"]).is_file()
                                  for s in args.resolutions):
      break
    chunks.append(chunk)
  marker = cache.done_marker(args.out, args.process_index, args.process_count)
  if marker.is_file() and json.loads(marker.read_text())["chunks"] == len(chunks):
    return chunks
  marker.unlink(missing_ok=True)
  for path in state.glob("chunk-*.json"):
    if int(path.stem.split("-")[1]) >= len(chunks):
      path.unlink()
  prefix = f"part-{args.process_index:05d}-of-{args.process_count:05d}-"
  for side in args.resolutions:
    for path in (args.out / str(side)).glob(prefix + "*.tmp-*"):
      path.unlink()
  return chunks


def _encode_chunks(args: BuildArgs, encoder: "Encoder", tfds_source,
                   chunks: list[dict[str, Any]]) -> dict[str, Any]:
  """Encodes this process's items after the finished chunks; returns the model facts."""
  start = chunks[-1]["end"] if chunks else 0
  total, candidates = (_folder_candidates(args, start) if tfds_source is None else
                       _tfds_candidates(args, tfds_source, start))
  vae_config = encoder.vae_config
  features = {s: record_layout(args.task, s, vae_config.downsample_factor, vae_config.latent_channels,
                               args.text_length, encoder.text_dim) for s in args.resolutions}
  for side in args.resolutions:
    (args.out / str(side)).mkdir(parents=True, exist_ok=True)
  _state_dir(args).mkdir(parents=True, exist_ok=True)
  report = manifests.SkipReport()
  for chunk in chunks:
    report.merge(manifests.SkipReport.from_dict(chunk["report"]))
  stream = _validated(candidates, args.workers)
  desc = f"build_cache {args.task} {args.process_index}/{args.process_count}"
  with tqdm.tqdm(total=total, initial=start, desc=desc, unit="item", mininterval=1.0) as bar:
    bar.set_postfix(kept=report.kept, skipped=report.total_skipped)
    pos = start
    while pos < total:
      chunk = _encode_chunk(args, encoder, features, len(chunks), pos, stream, bar, report)
      if chunk["end"] == pos:
        raise RuntimeError(f"the input ended at item {pos} of this process, not {total}: "
                           "did the manifest change during the build?")
      chunks.append(chunk)
      pos = chunk["end"]
  return {"chunks": len(chunks), "latent_channels": vae_config.latent_channels,
          "vae_scale": vae_config.downsample_factor, "text_dim": encoder.text_dim,
          "vision": encoder.vision,
          "prepare_report": getattr(tfds_source, "prepare_report", None)}


def _encode_chunk(args, encoder, features, index, start, stream, bar, report) -> dict[str, Any]:
  """Encodes items from position `start` until `examples_per_shard` are kept; writes the chunk."""
  name = _shard_name(args, index)
  writers = {s: cache.ShardWriter(args.out / str(s) / name) for s in args.resolutions}
  chunk_report = manifests.SkipReport()
  batch: list[Item] = []
  end = start

  def flush():
    for side, records in encoder.encode(batch, args.resolutions).items():
      for record in records:
        got = cache.record_features(record)
        if got != features[side]:
          raise AssertionError(f"record layout {got} != expected {features[side]}")
        writers[side].write(record)
    batch.clear()

  try:
    for pos, item, item_report in stream:
      chunk_report.merge(item_report)
      end = pos + 1
      if item is not None:
        chunk_report.kept += 1
        batch.append(item)
        if len(batch) == args.batch_size:
          flush()
      bar.update(1)
      bar.set_postfix(kept=report.kept + chunk_report.kept,
                      skipped=report.total_skipped + chunk_report.total_skipped, refresh=False)
      if chunk_report.kept == args.examples_per_shard:
        break
    if batch:
      flush()
  except BaseException:
    for w in writers.values():
      w.abort()
    raise
  for w in writers.values():
    if chunk_report.kept:
      w.commit()
    else:
      w.abort()
  report.merge(chunk_report)
  chunk = {"chunk": index, "start": start, "end": end, "kept": chunk_report.kept,
           "shard": name if chunk_report.kept else None, "report": chunk_report.to_dict()}
  cache.write_json_atomic(_state_dir(args) / f"chunk-{index:05d}.json", chunk)
  return chunk


def _finalize(args: BuildArgs) -> tuple[bool, manifests.SkipReport, list[int]]:
  """Writes every side's cache_info.json when all processes are done.

  Returns (complete, the whole cache's skip report (so far), processes not done).
  """
  p = args.process_count
  markers = [cache.done_marker(args.out, i, p) for i in range(p)]
  waiting = [i for i, m in enumerate(markers) if not m.is_file()]
  report = manifests.SkipReport()
  shards: list[str] = []
  facts = None
  for i, marker in enumerate(markers):
    if i in waiting:
      continue
    done = json.loads(marker.read_text())
    facts = facts or done
    state = args.out / cache.BUILD_DIR / f"process-{i:05d}-of-{p:05d}"
    for k in range(done["chunks"]):
      chunk = json.loads((state / f"chunk-{k:05d}.json").read_text())
      report.merge(manifests.SkipReport.from_dict(chunk["report"]))
      if chunk["shard"]:
        shards.append(chunk["shard"])
  if waiting:
    return False, report, waiting
  if not report.kept:
    raise BuildError(f"no item of {args.source.split(':', 1)[1]} was kept ({report.summary()}); "
                     f"examples: {report.examples}")
  for side in args.resolutions:
    missing = [s for s in shards if not (args.out / str(side) / s).is_file()]
    if missing:
      raise BuildError(f"{args.out / str(side)}: shard files {missing[:3]} are gone; re-run the "
                       "processes that wrote them with the same arguments")
    features = record_layout(args.task, side, facts["vae_scale"], facts["latent_channels"],
                             args.text_length, facts["text_dim"])
    counts = report.to_dict()
    info = {"num_examples": report.kept, "shards": shards, "features": features,
            "size": [side, side], "task": args.task, "latent_channels": facts["latent_channels"],
            "vae_scale": facts["vae_scale"], "text_length": args.text_length,
            "text_dim": facts["text_dim"], "text_vision": facts["vision"], "kept": report.kept,
            "skipped": counts["skipped"], "skip_examples": counts["examples"],
            "encoders": {"vae": args.vae, "text_encoder": args.text_encoder},
            "source": args.source, "resolutions": list(args.resolutions),
            "process_count": p}
    if facts.get("prepare_report"):
      info["tfds_prepare_skipped"] = facts["prepare_report"]["skipped"]
    cache.write_json_atomic(args.out / str(side) / cache.INFO_FILE, info)
  return True, report, []


def build(args: BuildArgs, vae_config: VAEConfig, tfds_source=None) -> dict[str, Any]:
  """Runs this process's share of the build (resuming), then completes the cache if it can.

  Returns {"complete": bool, "kept", "skipped": {reason: count}, "waiting": [process ids]}
  for the whole cache as far as finished processes tell.
  """
  _check_args_record(args)
  chunks = _finished_chunks(args)
  marker = cache.done_marker(args.out, args.process_index, args.process_count)
  if not marker.is_file():
    encoder = Encoder(args, vae_config)
    _write_args_record(args)
    facts = _encode_chunks(args, encoder, tfds_source, chunks)
    cache.write_json_atomic(marker, facts)
  complete, report, waiting = _finalize(args)
  return {"complete": complete, "kept": report.kept,
          "skipped": {r: n for r, n in report.skipped.items() if n}, "waiting": waiting,
          "summary": report.summary()}


def main(argv: Sequence[str] | None = None) -> int:
  """The command; returns the exit status (0 done, 2 a mistake in the command)."""
  try:
    args, vae_config, tfds_source = parse_args(argv)
    result = build(args, vae_config, tfds_source)
  except BuildError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  where = f"{args.out} ({args.task}, sides {', '.join(map(str, args.resolutions))})"
  if result["complete"]:
    print(f"build_cache: {where} complete: {result['summary']}")
  else:
    print(f"build_cache: process {args.process_index} of {args.process_count} done; {where} "
          f"completes when processes {result['waiting']} finish; so far {result['summary']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
