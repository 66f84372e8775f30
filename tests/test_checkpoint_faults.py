"""What a crash, a corrupted file or a full disk leaves, and what the next start makes of it
(checkpoints.manager / restore_latest / save / finish on a small state; the trainer's own
kill-and-resume runs are tests/test_pod.py and benchmarks/faults.py)."""
import glob
import logging
import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import synthetic
from unidiffuser_jax import checkpoints, errors


def _state(step):
  return {"w": jnp.full((64, 8), float(step)), "b": jnp.arange(8) + step}


def _abstract():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      _state(0))


def _iterator():
  return synthetic.make_iterator(resolution=2, clip_resolution=2, max_length=2, vocab_size=5,
                                 host_batch=2, seed=0)


def _write(workdir, steps, keep=5):
  mngr = checkpoints.manager(str(workdir), keep=keep)
  it = _iterator()
  for s in steps:
    next(it)
    checkpoints.save(mngr, s, _state(s), it, {"step": s})
  checkpoints.finish(mngr)
  mngr.close()


def _restore(workdir, step=0):
  mngr = checkpoints.manager(str(workdir), keep=5)
  return checkpoints.restore_latest(mngr, _abstract(), _iterator(), step=step)


def _files(workdir, step, pattern):
  return glob.glob(str(workdir / "checkpoints" / str(step) / pattern), recursive=True)


def test_a_save_killed_midway_is_ignored_and_named(tmp_path, caplog):
  _write(tmp_path, [1, 2])
  # What a kill during the async write of step 3 leaves (orbax 0.12.8; seen with SIGKILL):
  # the step under its tmp name, items half written.
  shutil.copytree(tmp_path / "checkpoints" / "2", tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp")
  os.remove(tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp" / "commit_success.txt")
  with caplog.at_level(logging.WARNING):
    step, state, it = _restore(tmp_path)
  assert step == 2 and float(state["w"][0, 0]) == 2.0
  assert next(it)["tokens"].shape == (2, 2)
  assert "ignoring the incomplete checkpoint" in caplog.text and "3.orbax-checkpoint-tmp" in caplog.text
  assert not os.path.exists(tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp")   # cleaned up


def _delete_arrays(d, s):
  files = [f for f in _files(d, s, "state/**/d/*") if os.path.isfile(f)]
  assert files
  for f in files:
    os.remove(f)


def _truncate_arrays(d, s):
  files = [f for f in _files(d, s, "state/**/d/*") if os.path.isfile(f)]
  assert files
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)


def _garbage_metadata(d, s):
  (path,) = _files(d, s, "state/_METADATA")
  with open(path, "w") as f:
    f.write("{not json")


def _garbage_iterator_state(d, s):
  (path,) = _files(d, s, "data/process_0-of-1.json")
  with open(path, "w") as f:
    f.write("\x00garbage")


@pytest.mark.parametrize("corrupt", [_delete_arrays, _truncate_arrays, _garbage_metadata,
                                     _garbage_iterator_state])
def test_an_unreadable_checkpoint_is_named_and_skipped(tmp_path, caplog, corrupt):
  _write(tmp_path, [1, 2, 3])
  corrupt(tmp_path, 3)
  with caplog.at_level(logging.WARNING):
    step, state, _ = _restore(tmp_path)
  assert step == 2 and float(state["w"][0, 0]) == 2.0
  assert f"{tmp_path / 'checkpoints' / '3'} cannot be read" in caplog.text
  assert "resuming from step 2 in " in caplog.text and "; skipped the unreadable step 3" in caplog.text
  # Set aside (kept for inspection) so that training on can write step 3 again.
  assert os.path.isdir(tmp_path / "checkpoints" / "3.unreadable")
  _write(tmp_path, [3])
  assert _restore(tmp_path)[0] == 3


def test_asking_for_exactly_an_unreadable_step_is_an_error(tmp_path):
  _write(tmp_path, [1, 2])
  _garbage_metadata(tmp_path, 2)
  with pytest.raises(errors.StopError, match=r"train.restore_step=2: the checkpoint .*/2 cannot be read"):
    _restore(tmp_path, step=2)
  with pytest.raises(errors.ConfigError, match=r"also holds the newer steps \[2\]"):
    _restore(tmp_path, step=1)
  with pytest.raises(errors.ConfigError, match=r"no complete checkpoint at that step \(complete: \[1, 2\]\)"):
    _restore(tmp_path, step=7)


def test_nothing_readable_is_an_error_not_a_fresh_start(tmp_path):
  _write(tmp_path, [1, 2])
  _garbage_metadata(tmp_path, 1)
  _garbage_metadata(tmp_path, 2)
  with pytest.raises(errors.StopError, match=r"no checkpoint in .* can be read \(step 2: .*; step 1: "):
    _restore(tmp_path)


def test_save_failure_names_disk_full_and_the_intact_steps(tmp_path):
  _write(tmp_path, [1, 2])
  mngr = checkpoints.manager(str(tmp_path), keep=5)
  err = checkpoints.save_failed(mngr, ValueError(
      "RESOURCE_EXHAUSTED: Error writing \"a/0.0\" ... No space left on device [os_error_code='28']"))
  assert str(err).startswith(f"saving a checkpoint in {tmp_path / 'checkpoints'} failed (the disk "
                             f"is full); the complete checkpoints [1, 2] are intact: free space")
  assert "resume from step 2" in str(err) and "\n" not in str(err)


def _mount_tmpfs(path, size):
  os.makedirs(path)
  try:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True, capture_output=True)
  except (OSError, subprocess.CalledProcessError):
    pytest.skip("a tmpfs cannot be mounted here (needs root)")


def test_a_full_disk_stops_with_a_clear_error_and_keeps_older_steps(tmp_path):
  """A real ENOSPC: the checkpoints folder on a 1 MiB tmpfs."""
  ckpt = tmp_path / "checkpoints"
  _mount_tmpfs(ckpt, "1m")
  try:
    mngr = checkpoints.manager(str(tmp_path), keep=10)
    it = _iterator()
    # 256 KiB of incompressible values per step (the array files are compressed).
    big = lambda s: {"w": jax.random.normal(jax.random.key(s), (256, 256)), "b": jnp.arange(8) + s}
    with pytest.raises(errors.StopError, match=r"failed \(the disk is full\); the complete "
                       r"checkpoints \[(.*)\] are intact") as e:
      for s in range(1, 10):
        checkpoints.save(mngr, s, big(s), it, {"step": s})
      checkpoints.finish(mngr)
    kept = [int(x) for x in e.value.args[0].split("checkpoints [")[1].split("]")[0].split(", ")]
    assert kept == list(range(1, len(kept) + 1)) and 1 <= len(kept) < 9, kept
    mngr = checkpoints.manager(str(tmp_path), keep=10)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            big(0))
    step, state, _ = checkpoints.restore_latest(mngr, abstract, _iterator())
    assert step == kept[-1]
    jax.tree.map(np.testing.assert_array_equal, state, big(step))
  finally:
    subprocess.run(["umount", str(ckpt)], check=False)


def test_a_data_position_from_another_process_count_is_refused_unless_restarted(tmp_path):
  """The files two processes leave (tests/test_pod.py makes real ones); here renamed by hand."""
  _write(tmp_path, [1])
  data = tmp_path / "checkpoints" / "1" / "data"
  os.rename(data / "process_0-of-1.json", data / "process_0-of-2.json")
  shutil.copy(data / "process_0-of-2.json", data / "process_1-of-2.json")
  assert checkpoints.data_writers(tmp_path / "checkpoints" / "1") == 2
  with pytest.raises(errors.ConfigError, match=r"written by 2 processes and this run has 1: .* "
                     r"--config.train.restart_data_on_resize=True"):
    _restore(tmp_path)
  mngr = checkpoints.manager(str(tmp_path), keep=5)
  fresh = _iterator()
  step, state, it = checkpoints.restore_latest(mngr, _abstract(), fresh, restart_data_on_resize=True)
  assert step == 1 and it is fresh and float(state["w"][0, 0]) == 1.0
