"""`manifest.json` of an export directory: its format tag, checksums, and validated loading.

Shared by the exporter (which writes it) and the TFLite reference app (which
reads it and refuses files whose sha256 does not match).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST_FORMAT = 'dreamlite-tflite/1'
MANIFEST_NAME = 'manifest.json'


def sha256_file(path: str | Path) -> str:
  """Hex sha256 of a file, read in 1 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def write_manifest(model_dir: str | Path, manifest: dict) -> Path:
  path = Path(model_dir) / MANIFEST_NAME
  path.write_text(json.dumps(manifest, indent=2))
  return path


def load_manifest(model_dir: str | Path, verify: bool = True) -> dict:
  """Reads `manifest.json`; checks its format and (optionally) every listed file's sha256."""
  model_dir = Path(model_dir)
  path = model_dir / MANIFEST_NAME
  if not path.is_file():
    raise FileNotFoundError(f'no {MANIFEST_NAME} in {model_dir}')
  manifest = json.loads(path.read_text())
  if manifest.get('format') != MANIFEST_FORMAT:
    raise ValueError(f'{path}: format {manifest.get("format")!r}, expected {MANIFEST_FORMAT!r}')
  for field in ('models', 'text', 'scheduler', 'latent', 'image', 'unet'):
    if field not in manifest:
      raise ValueError(f'{path}: missing field {field!r}')
  if verify:
    files = [(e['file'], e['sha256']) for e in manifest['models'].values()]
    table = manifest['text']['embedding_table']
    for name, digest in files + [(table['file'], table['sha256'])]:
      if not (model_dir / name).is_file():
        raise FileNotFoundError(f'{path}: listed file {name} is missing')
      if sha256_file(model_dir / name) != digest:
        raise ValueError(f'{model_dir / name}: sha256 does not match {MANIFEST_NAME}')
  return manifest
