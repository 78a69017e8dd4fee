"""Trainer tests share one persistent XLA compile cache (this directory only).

The same tiny step is compiled by in-process runs and by child processes
(kill/resume, multi-process); a shared cache makes the repeats cheap.
"""
import os

import jax
import pytest
from jax._src import compilation_cache  # reset_cache: the cache is set up once per process


@pytest.fixture(scope="module", autouse=True)
def shared_compile_cache(tmp_path_factory):
  path = tmp_path_factory.getbasetemp() / "training_xla_cache"
  path.mkdir(exist_ok=True)
  path = str(path)
  previous = (jax.config.jax_compilation_cache_dir,
              jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  compilation_cache.reset_cache()
  os.environ["DREAMLITE_TEST_COMPILE_CACHE"] = path
  yield path
  os.environ.pop("DREAMLITE_TEST_COMPILE_CACHE", None)
  jax.config.update("jax_compilation_cache_dir", previous[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
  compilation_cache.reset_cache()
