"""Image decoding, resolution/aspect-ratio buckets and crops shared by all pipelines.

Real corpora come in every size and aspect ratio while a training batch needs
one shape. Each image is assigned the bucket (a `(height, width)` pair of about
`resolution**2` pixels) whose aspect ratio is closest to its own, resized so it
covers the bucket, then cropped to it (centre for evaluation and caching, random
for training). Source and target of an edit pair are cropped with the same
offsets so they stay pixel-aligned.
"""
from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

Size = tuple[int, int]  # (height, width) in pixels.

DEFAULT_ASPECT_RATIOS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16)  # width / height
CROP_MODES = ("center", "random")


class ImageDecodeError(ValueError):
  """Raised when bytes cannot be decoded into an RGB image."""


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
  """Decodes encoded image bytes (JPEG, PNG, WebP, ...) to RGB.

  Applies the EXIF orientation so phone photos are upright.

  Returns:
    uint8 `[H, W, 3]`.

  Raises:
    ImageDecodeError: naming `name` when the bytes are not a readable image.
  """
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      im = ImageOps.exif_transpose(im)
      rgb = im.convert("RGB")
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, ...).
    raise ImageDecodeError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e
  return np.asarray(rgb, dtype=np.uint8)


def make_buckets(resolution: int,
                 aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS,
                 multiple: int = 32) -> list[Size]:
  """Buckets of about `resolution**2` pixels, one per aspect ratio (width/height).

  Sides are multiples of `multiple` (the VAE downsamples 8x and the U-Net 4x
  more). Returns a de-duplicated list of `(height, width)`.
  """
  if resolution <= 0 or resolution % multiple:
    raise ValueError(f"resolution={resolution} must be a positive multiple of {multiple}")
  buckets: list[Size] = []
  for ar in aspect_ratios:
    if ar <= 0:
      raise ValueError(f"aspect ratio {ar} must be positive")
    h = max(multiple, round(resolution / math.sqrt(ar) / multiple) * multiple)
    w = max(multiple, round(resolution * math.sqrt(ar) / multiple) * multiple)
    if (h, w) not in buckets:
      buckets.append((h, w))
  return buckets


def nearest_bucket(height: int, width: int, buckets: Sequence[Size]) -> int:
  """Index of the bucket whose aspect ratio is closest (in log space) to `width/height`."""
  log_ar = math.log(width / height)
  return min(range(len(buckets)),
             key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - log_ar))


def cover_size(height: int, width: int, target: Size) -> Size:
  """Smallest `(h, w)` with the input's aspect ratio that covers `target`."""
  scale = max(target[0] / height, target[1] / width)
  return (max(target[0], round(height * scale)), max(target[1], round(width * scale)))


def resize(image: np.ndarray, size: Size) -> np.ndarray:
  """Resizes uint8 `[H, W, 3]` to `size` with a bicubic (antialiased) filter."""
  if image.shape[:2] == tuple(size):
    return image
  pil = Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC)
  return np.asarray(pil, dtype=np.uint8)


def resize_to_cover(image: np.ndarray, target: Size) -> np.ndarray:
  """Resizes uint8 `[H, W, 3]` keeping its aspect ratio so it covers `target`."""
  return resize(image, cover_size(image.shape[0], image.shape[1], target))


def crop_offsets(image_size: Size, target: Size, mode: str,
                 rng: np.random.Generator | None = None) -> tuple[int, int]:
  """Top-left corner `(y, x)` of a `target` crop inside `image_size`."""
  if mode not in CROP_MODES:
    raise ValueError(f"crop mode {mode!r} is not one of {CROP_MODES}")
  dy, dx = image_size[0] - target[0], image_size[1] - target[1]
  if dy < 0 or dx < 0:
    raise ValueError(f"cannot crop {target} out of an image of size {image_size}")
  if mode == "center":
    return dy // 2, dx // 2
  if rng is None:
    raise ValueError("crop mode 'random' needs an rng")
  return int(rng.integers(0, dy + 1)), int(rng.integers(0, dx + 1))


def fit(images: Sequence[np.ndarray], target: Size, mode: str = "center",
        rng: np.random.Generator | None = None) -> list[np.ndarray]:
  """Resizes to cover `target` and crops, identically for all `images`.

  All images are resized to the cover size of the first one (an edit pair's
  source follows its target) and cropped with the same offsets.

  Returns:
    uint8 `[target_h, target_w, 3]` arrays, one per input.
  """
  first = images[0]
  size = cover_size(first.shape[0], first.shape[1], target)
  resized = [resize(im, size) for im in images]
  y, x = crop_offsets(size, target, mode, rng)
  return [np.ascontiguousarray(im[y:y + target[0], x:x + target[1]]) for im in resized]


def to_unit_range(image: np.ndarray) -> np.ndarray:
  """uint8 `[..., 3]` in [0, 255] -> float32 in [-1, 1]."""
  return image.astype(np.float32) * (2.0 / 255.0) - 1.0
