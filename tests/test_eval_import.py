"""--mode=import of the FID Inception (config.weights.inception) for --mode=eval."""
import jax
import numpy as np
import pytest
import torch

from configs import demo
from unidiffuser_jax import eval_features, weight_jobs
from unidiffuser_jax.weights import inception as inception_weights
from tests.test_fid import _random_state_dict


@pytest.mark.slow   # torch.save / load of a 100 MB state dict
def test_import_inception_and_read_it_back(tmp_path):
  pth = tmp_path / inception_weights.FID_WEIGHTS_FILE
  torch.save(_random_state_dict(1), pth)
  config = demo.get_config("tiny")
  config.weights.inception = str(pth)
  done = weight_jobs.run_import(config, str(tmp_path / "run"))
  assert set(done) == {"inception"}
  dest = done["inception"]["path"]
  assert done["inception"]["overrides"] == [f"--config.eval.inception={dest}"]
  got, want = eval_features.load_inception(dest), eval_features.load_inception(str(pth))
  leaves_got, leaves_want = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(leaves_got) == len(leaves_want) > 300
  for a, b in zip(leaves_got, leaves_want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
