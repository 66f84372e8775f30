"""Non-finite steps: skipped in-graph (state unchanged but the step count), counted, and the run
stops after train.max_nonfinite_steps in a row with the last good checkpoint intact."""
import glob

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import demo
from unidiffuser_jax import checkpoints, nonfinite, train, vocab


def _toy_step(state, frozen, batch):
  """A plain SGD step on sum(params * x): NaN in x gives NaN grads, as a real NaN batch would."""
  loss, grads = jax.value_and_grad(lambda p: jnp.sum(p["w"] * batch["x"]))(state.params)
  params = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads)
  new = state.replace(step=state.step + 1, params=params, ema_params=params,
                      opt_state=state.opt_state + 1)
  return new, {"loss": loss, "grad_norm": optax.global_norm(grads)}


def _toy_state():
  w = {"w": jnp.arange(3.0)}
  return train.TrainState(step=jnp.zeros((), jnp.int32), params=w, ema_params=w,
                          opt_state=jnp.zeros((), jnp.int32))


def test_guard_keeps_state_on_a_nan_batch_and_counts_it():
  step = jax.jit(nonfinite.guard(_toy_step))
  state = _toy_state()
  good, m = step(state, None, {"x": jnp.ones(3)})
  assert float(m["nonfinite"]) == 0.0 and int(good.step) == 1
  np.testing.assert_allclose(good.params["w"], [-0.1, 0.9, 1.9])
  bad, m = step(good, None, {"x": jnp.array([1.0, jnp.nan, 1.0])})
  assert float(m["nonfinite"]) == 1.0 and int(bad.step) == 2   # the batch was consumed
  jax.tree.map(np.testing.assert_array_equal, (bad.params, bad.ema_params, bad.opt_state),
               (good.params, good.ema_params, good.opt_state))
  inf, m = step(good, None, {"x": jnp.array([jnp.inf, 0.0, 0.0])})
  assert float(m["nonfinite"]) == 1.0
  np.testing.assert_array_equal(inf.params["w"], good.params["w"])


def test_poison_steps_are_the_listed_steps_only():
  step = jax.jit(nonfinite.guard(_toy_step, poison_steps=(2,)))
  s1, m1 = step(_toy_state(), None, {"x": jnp.ones(3)})
  s2, m2 = step(s1, None, {"x": jnp.ones(3)})
  s3, m3 = step(s2, None, {"x": jnp.ones(3)})
  assert [float(m["nonfinite"]) for m in (m1, m2, m3)] == [0.0, 1.0, 0.0]
  assert np.isnan(float(m2["loss"]))
  np.testing.assert_array_equal(s2.params["w"], s1.params["w"])
  assert not np.array_equal(s3.params["w"], s2.params["w"])


def test_watch_stops_after_consecutive_bad_steps_only():
  watch = nonfinite.Watch(3)
  for bad in (1, 1, 0, 1, 1):
    watch.record({"nonfinite": jnp.float32(bad)})
  assert watch.check(5) == 4   # 4 skipped in all, never 3 in a row
  watch.record({"nonfinite": jnp.float32(1)})
  with pytest.raises(nonfinite.NonFiniteError, match=r"stopped at step 6: the last 3 steps .*"
                     r"max_nonfinite_steps=3"):
    watch.check(6)


def _tiny(**train_kw):
  c = demo.get_config("tiny")
  c.train.update(log_every=1, checkpoint_every=1, keep_checkpoints=20, **train_kw)
  return vocab.derive(c)


def _saved(workdir, step):
  return checkpoints.load_params(f"{workdir}/checkpoints/{step}", key=None)


@pytest.mark.slow
def test_poisoned_steps_leave_params_ema_and_optimizer_unchanged(tmp_path):
  config = _tiny(steps=5)
  config.debug.poison_steps = (3, 4)
  last = train.train(config, str(tmp_path))
  assert last["nonfinite"] == 0.0 and np.isfinite(last["loss"])
  s2, s3, s4, s5 = (_saved(tmp_path, s) for s in (2, 3, 4, 5))
  for s in (s3, s4):
    jax.tree.map(np.testing.assert_array_equal,
                 (s["params"], s["ema_params"], s["opt_state"]),
                 (s2["params"], s2["ema_params"], s2["opt_state"]))
  assert (int(s3["step"]), int(s4["step"])) == (3, 4)
  assert not np.array_equal(jax.tree.leaves(s5["params"])[0], jax.tree.leaves(s4["params"])[0])


@pytest.mark.slow
def test_too_many_bad_steps_stop_the_run_with_the_last_good_checkpoint(tmp_path):
  config = _tiny(steps=6, max_nonfinite_steps=2, profile_steps=(1, 6))
  config.debug.poison_steps = (2, 3, 4)
  with pytest.raises(nonfinite.NonFiniteError, match="stopped at step 3: the last 2 steps"):
    train.train(config, str(tmp_path))
  # The trace of steps 1-6, cut short at step 3, was still stopped and written (run_loop's finally).
  assert glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)
  # Step 2 (one bad step: below the limit) was saved with step 1's weights; step 3 was not.
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [1, 2]
  jax.tree.map(np.testing.assert_array_equal, _saved(tmp_path, 2)["params"],
               _saved(tmp_path, 1)["params"])
