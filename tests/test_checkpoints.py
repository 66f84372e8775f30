"""checkpoints.check_params: the one check of a loaded parameter tree against the config's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unidiffuser_jax import checkpoints, errors

TEMPLATE = {"a": {"kernel": jax.ShapeDtypeStruct((2, 3), jnp.float32),
                  "bias": jax.ShapeDtypeStruct((3,), jnp.float32)},
            "b": jax.ShapeDtypeStruct((4,), jnp.float32)}


def test_matching_tree_passes():
  loaded = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), TEMPLATE)
  checkpoints.check_params(loaded, TEMPLATE, "init_from=DIR", "config.model")


def test_every_kind_of_mismatch_is_named_in_one_line():
  loaded = {"a": {"kernel": np.zeros((3, 2)), "bias": np.zeros(3)}, "c": np.zeros(1)}
  with pytest.raises(errors.ConfigError) as e:
    checkpoints.check_params(loaded, TEMPLATE, "init_from=DIR", "config.model")
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith("init_from=DIR does not match config.model (3 problem(s)): ")
  assert "missing b" in msg and "unexpected c" in msg
  assert "a/kernel has shape (3, 2) but config.model needs (2, 3)" in msg
  assert "a/bias" not in msg


def test_long_lists_are_cut_with_a_count():
  template = {f"p{i:02d}": jax.ShapeDtypeStruct((1,), jnp.float32) for i in range(20)}
  with pytest.raises(errors.ConfigError, match=r"\(20 problem\(s\)\): missing p00; .*; 12 more$"):
    checkpoints.check_params({}, template, "x", "config.model")
