"""Multi-process jobs: how `main` starts JAX, and that only process 0 writes the job's files."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import pytest

from dreamlite_jax import main as main_lib
from dreamlite_jax.job import stages

from test_job_validation import job_config, make_cache

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
JOB_FILES = ("config.json", "report.md", "scores.json")


def test_process_flags_are_all_or_nothing():
  base = ["--config", "c.py", "--workdir", "w"]
  args, _ = main_lib.parse_args(base + ["--coordinator", "h:1", "--num-processes", "2",
                                        "--process-id", "1"])
  assert (args.coordinator, args.num_processes, args.process_id) == ("h:1", 2, 1)
  for bad in (["--coordinator", "h:1"], ["--num-processes", "2", "--process-id", "0"],
              ["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
              ["--distributed", "--coordinator", "h:1", "--num-processes", "2",
               "--process-id", "0"]):
    with pytest.raises(SystemExit):
      main_lib.parse_args(base + bad)


def test_main_joins_the_processes_before_loading_the_job(monkeypatch):
  events = []
  monkeypatch.setattr(jax.config, "update",
                      lambda name, value: events.append(("config", name, value)))
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda *a, **kw: events.append(("initialize", a, kw)))
  monkeypatch.setattr(stages, "load_job_config",
                      lambda *a, **kw: events.append(("load",)) or "config")
  monkeypatch.setattr(stages, "run_job", lambda *a, **kw: {})
  base = ["--config", "c.py", "--workdir", "w", "--compile-cache", ""]

  main_lib.main(base + ["--coordinator", "h:7", "--num-processes", "2", "--process-id", "1"])
  assert events == [
      ("config", "jax_cpu_collectives_implementation", "gloo"),
      ("initialize", (), dict(coordinator_address="h:7", num_processes=2, process_id=1)),
      ("load",)]
  events.clear()
  main_lib.main(base + ["--distributed"])
  assert events == [("initialize", (), {}), ("load",)]  # the cluster environment decides
  events.clear()
  main_lib.main(base)
  assert events == [("load",)]


@pytest.fixture
def two_processes(monkeypatch):
  """This process as one of two: `index` is its process index, `synced` the sync tags,
  `at_sync(tag)` what the other processes have done when everyone passes `tag`."""
  state = {"index": 0, "synced": [], "at_sync": lambda tag: None}

  def sync(tag):
    state["synced"].append(tag)
    state["at_sync"](tag)

  monkeypatch.setattr(jax, "process_index", lambda: state["index"])
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(stages.mesh_lib, "barrier", sync)
  return state


@pytest.fixture
def stub_runners(monkeypatch):
  calls = []

  def stub(ctx):
    calls.append(ctx.name)
    assert os.path.isdir(ctx.workdir) or jax.process_index() != 0
    return {"steps": 1}

  for kind in list(stages.STAGE_RUNNERS):
    monkeypatch.setitem(stages.STAGE_RUNNERS, kind, stub)
  return calls


@pytest.mark.parametrize("index", [0, 1])
def test_only_process_0_writes_the_job_files_and_every_process_waits_for_it(
    index, two_processes, stub_runners, tmp_path):
  config = job_config(make_cache(tmp_path / "t2i"), make_cache(tmp_path / "edit"))
  workdir = str(tmp_path / "job")
  two_processes["index"] = index
  if index == 1:
    def process_0(tag):  # process 0 has written a stage's DONE.json when all pass its sync
      if tag.endswith(":done"):
        stage = tag.split(":")[1]
        os.makedirs(os.path.join(workdir, stage), exist_ok=True)
        stages.write_json(stages.done_path(workdir, stage), {"results": {"steps": 1}})
    two_processes["at_sync"] = process_0
  records = stages.run_job(config, workdir, log=lambda m: None)
  assert stub_runners == ["pretrain_a", "pretrain_b"] and list(records) == stub_runners
  assert two_processes["synced"] == [
      "dreamlite_job:checked", "dreamlite_job:pretrain_a:started",
      "dreamlite_job:pretrain_a:done", "dreamlite_job:pretrain_b:started",
      "dreamlite_job:pretrain_b:done", "dreamlite_job:report"]
  written = {os.path.relpath(os.path.join(d, f), workdir)
             for d, _, files in os.walk(workdir) for f in files}
  done = {"pretrain_a/DONE.json", "pretrain_b/DONE.json"}
  if index == 0:
    assert written == {*JOB_FILES, "pretrain_a/STARTED.json", "pretrain_b/STARTED.json", *done}
  else:  # only what the emulated process 0 wrote: pretrain_b read its parent after the sync
    assert written == done


def test_one_process_never_syncs(stub_runners, tmp_path, monkeypatch):
  """A one-process job never asks the coordination service (there is none) to wait."""
  class NoService:
    @property
    def client(self):
      raise AssertionError("a one-process job used the coordination service")

  monkeypatch.setattr(stages.mesh_lib.distributed, "global_state", NoService())
  config = job_config(make_cache(tmp_path / "t2i"), make_cache(tmp_path / "edit"))
  stages.run_job(config, str(tmp_path / "job"), log=lambda m: None)
  assert os.path.exists(stages.done_path(str(tmp_path / "job"), "pretrain_b"))


_CHILD = textwrap.dedent("""
    import json, os, sys
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from dreamlite_jax import main
    from dreamlite_jax.job import stages

    def stub(ctx):
      # A collective over both processes, then a file in the stage directory that
      # process 0 created before the others started the stage.
      total = int(np.sum(multihost_utils.process_allgather(np.int32(jax.process_index() + 1))))
      with open(os.path.join(ctx.workdir, f"ran_by_{jax.process_index()}"), "w") as f:
        f.write(str(total))
      return {"steps": 1, "total": total}

    for kind in list(stages.STAGE_RUNNERS):
      stages.STAGE_RUNNERS[kind] = stub
    records = main.main(sys.argv[1:])
    print("RESULT " + json.dumps({"process": jax.process_index(), "count": jax.process_count(),
                                  "stages": list(records),
                                  "totals": [r["results"]["total"] for r in records.values()]}))
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_run_a_job_through_main(tmp_path):
  """`--coordinator` on CPU (gloo): both processes run every stage; process 0 alone
  writes the records and report."""
  config_file = tmp_path / "job.py"
  config_file.write_text("from test_job_validation import job_config as get_config\n")
  script = tmp_path / "child.py"
  script.write_text(_CHILD)
  workdir = tmp_path / "job"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([ROOT, os.path.dirname(__file__)]))
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, str(script), "--config", str(config_file), "--workdir", str(workdir),
       "--compile-cache", "", "--coordinator", f"localhost:{port}", "--num-processes", "2",
       "--process-id", str(i), f"--config.data.t2i_cache={make_cache(tmp_path / 't2i')}",
       f"--config.data.edit_cache={make_cache(tmp_path / 'edit')}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=240))
  finally:
    for proc in procs:
      proc.kill()
  results = []
  for proc, (out, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-3000:]
    results.append(json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:]))
  assert [r["process"] for r in results] == [0, 1] and {r["count"] for r in results} == {2}
  assert all(r["stages"] == ["pretrain_a", "pretrain_b"] and r["totals"] == [3, 3]
             for r in results)
  for name in ("pretrain_a", "pretrain_b"):
    assert sorted(os.listdir(workdir / name)) == ["DONE.json", "STARTED.json", "ran_by_0",
                                                  "ran_by_1"]
  assert all((workdir / f).is_file() for f in JOB_FILES)
  # The records on disk are the ones every process read back as the next stage's parent.
  assert stages.read_done(str(workdir), "pretrain_a")["results"] == {"steps": 1, "total": 3}
