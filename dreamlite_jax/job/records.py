"""A job's records on disk: each stage's DONE.json (what it produced) and STARTED.json
(the config and upstream runs of its latest start), written atomically."""
from __future__ import annotations

import json
import os

from etils import epath

DONE_FILE = "DONE.json"
STARTED_FILE = "STARTED.json"


def done_path(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, DONE_FILE)


def read_json(path: str) -> dict | None:
  path = epath.Path(path)
  if not path.exists():
    return None
  return json.loads(path.read_text())


def write_json(path: str, record: dict) -> None:
  path = epath.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
  tmp.replace(path)  # atomic on a file system: the file appears complete or not at all


def read_done(workdir: str, stage: str) -> dict | None:
  """The stage's DONE.json record ({"stage", "results", "wall_time_s", ...}) or None."""
  return read_json(done_path(workdir, stage))


def read_started(workdir: str, stage: str) -> dict | None:
  """The STARTED.json of a stage's latest run ({"config", "upstream_run_ids"}) or None."""
  return read_json(os.path.join(workdir, stage, STARTED_FILE))
