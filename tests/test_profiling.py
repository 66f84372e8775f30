"""Profiler traces of chosen train steps and the persistent compilation cache (profiling.py)."""
import glob
import os

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from configs import demo
from data_pipelines import synthetic
from unidiffuser_jax import errors, profiling, train, vocab


@pytest.mark.parametrize("steps", [(3,), (0, 2), (4, 2)])
def test_bad_profile_steps_are_one_config_error(steps, tmp_path):
  with pytest.raises(errors.ConfigError, match="profile_steps"):
    profiling.StepProfiler(str(tmp_path), steps)


@pytest.fixture
def keeps_suite_cache():
  """Puts jax's compilation-cache directory back to the suite's (tests/conftest.py) afterwards."""
  suite_cache = jax.config.jax_compilation_cache_dir
  yield
  jax.config.update("jax_compilation_cache_dir", suite_cache)
  compilation_cache.reset_cache()


@pytest.mark.slow
def test_train_writes_a_trace_and_fills_the_compilation_cache(tmp_path, monkeypatch,
                                                              keeps_suite_cache):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  cache = profiling.enable_compilation_cache("", str(tmp_path))
  assert cache == str(tmp_path / "compile_cache")
  config = vocab.derive(demo.get_config("tiny"))
  config.train.update(steps=3, log_every=3, profile_steps=(2, 3))
  it = synthetic.make_iterator(resolution=16, clip_resolution=16, max_length=6, vocab_size=60,
                               host_batch=config.train.batch_size, seed=5)
  train.train(config, str(tmp_path / "run"), data_iterator=it)
  traces = glob.glob(str(tmp_path / "run" / "profile" / "**" / "*.xplane.pb"), recursive=True)
  assert traces and os.path.getsize(traces[0]) > 0
  assert os.listdir(cache), "the train step's compiled program is in the cache"


def test_cache_dir_defers_to_jax_environment_variable(tmp_path, monkeypatch, keeps_suite_cache):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
  assert profiling.enable_compilation_cache("", str(tmp_path)) == str(tmp_path / "env")
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "env")
  assert profiling.enable_compilation_cache(str(tmp_path / "mine"), "w") == str(tmp_path / "mine")
  assert profiling.enable_compilation_cache("none", str(tmp_path)) == ""
