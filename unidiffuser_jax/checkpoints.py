"""Checkpoints: train state (params, EMA, optimizer), data iterator and config in one orbax step.

Layout in the workdir:
  checkpoints/<step>/state   sharded arrays (orbax StandardSave; async)
  checkpoints/<step>/data    grain iterator state, one JSON file per process
  checkpoints/<step>/config  the run's config as JSON (what produced these weights)
Saving the iterator with the state is what makes a resume see exactly the
records an unbroken run would have seen.

Crash safety (what orbax 0.12.8 does, checked in tests/test_checkpoint_faults.py): a step is
written under `<step>.orbax-checkpoint-tmp` and renamed to `<step>` (with commit_success.txt)
only once every item is complete, so a kill at any moment leaves finished steps and at most
one tmp dir. orbax never lists tmp dirs; `manager` logs and removes them. `restore_latest`
tries the complete steps newest first and skips (naming it) any that cannot be read, unless
the user asked for exactly that step. In a multi-process run the processes agree on each
step (a failure on any one process skips it on all), so they always resume from the same step.
`save` and `finish` turn a failed write (a full disk above all) into one StopError line; a
failed save never deletes older steps.
"""
import errno
import logging
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from unidiffuser_jax.errors import ConfigError, StopError

log = logging.getLogger(__name__)

STATE, DATA, CONFIG = "state", "data", "config"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's in-progress marker (path/atomicity_types.py)
_RESTORE_BARRIER = ocp.multihost.unique_barrier_key("Checkpointer:restore", prefix="")
_SHOWN_PROBLEMS = 8  # check_params names this many mismatches, then counts the rest


def manager(workdir: str, *, keep: int, async_save: bool = True,
            with_data: bool = True) -> ocp.CheckpointManager:
  items = (STATE, DATA, CONFIG) if with_data else (STATE, CONFIG)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      enable_async_checkpointing=async_save,
      create=True,
      cleanup_tmp_directories=True,  # interrupted saves (named by incomplete_steps first)
  )
  path = epath.Path(workdir) / "checkpoints"
  path = path.resolve() if "://" not in os.fspath(path) else path
  for name in incomplete_steps(path):
    if jax.process_index() == 0:
      log.warning("ignoring the incomplete checkpoint %s (an interrupted save); removing it",
                  path / name)
  return ocp.CheckpointManager(path, item_names=items, options=options)


def incomplete_steps(directory) -> list[str]:
  """Names of the interrupted saves (orbax tmp dirs) in a checkpoints directory."""
  d = epath.Path(directory)
  if not d.exists():
    return []
  return sorted(p.name for p in d.iterdir() if TMP_SUFFIX in p.name)


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, config_dict: dict) -> bool:
  """Starts saving `step` (the caller decides when a step is due); async for the arrays.

  A failure of this save or of the previous async one raises StopError (one line)."""
  items = {STATE: ocp.args.StandardSave(state), CONFIG: ocp.args.JsonSave(config_dict)}
  if data_iter is not None:
    items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
  try:
    return mngr.save(step, args=ocp.args.Composite(**items), force=True)
  except Exception as e:  # orbax re-raises an async failure of the previous save here
    raise save_failed(mngr, e) from e


def finish(mngr: ocp.CheckpointManager) -> None:
  """Waits for the last async save (every exit path must) and surfaces its failure."""
  try:
    mngr.wait_until_finished()
  except Exception as e:
    raise save_failed(mngr, e) from e


def save_failed(mngr: ocp.CheckpointManager, e: BaseException) -> StopError:
  text = str(e)
  full = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in text \
      or "os_error_code='28'" in text
  kept = mngr.all_steps()
  what = "the disk is full" if full else f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"
  return StopError(
      f"saving a checkpoint in {mngr.directory} failed ({what}); the complete checkpoints "
      f"{sorted(kept) or 'none'} are intact: {'free space' if full else 'fix the cause'} and "
      f"re-run the same command to resume from step {max(kept) if kept else 0}")


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, data_iter, *, step: int = 0,
                   restart_data_on_resize: bool = False):
  """Returns (step, state, data_iter) from the newest readable checkpoint, or None if there is none.

  `abstract_state` holds ShapeDtypeStructs with shardings, so every array is read straight
  into its sharded layout. A complete step that cannot be read (a truncated or deleted array
  file, garbage metadata) is named in a warning and the previous one is tried; if none can be
  read, StopError names each. `step` > 0 asks for exactly that step (train.restore_step):
  then an unreadable or missing step is an error, never a fallback.

  Elastic restore: the arrays load into any mesh and process count (`abstract_state`'s
  shardings). The data position cannot: each process saved its own reader's position, and with
  another process count the records are split differently, so continuing would repeat or skip
  records within the epoch. That is a ConfigError, unless `restart_data_on_resize`
  (train.restart_data_on_resize): then the state is restored and `data_iter` is left as given (a
  fresh pass over the data, in the reader's order, from its start).
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if step:
    newer = [s for s in steps if s > step]
    if step not in steps:
      raise ConfigError(f"train.restore_step={step}: {mngr.directory} has no complete checkpoint "
                        f"at that step (complete: {sorted(steps) or 'none'})")
    if newer:
      raise ConfigError(f"train.restore_step={step}: {mngr.directory} also holds the newer steps "
                        f"{sorted(newer)}, which training on from {step} would overwrite; move "
                        f"them out of the folder first")
    restored, error = _restore_everywhere(mngr, step, abstract_state, data_iter,
                                          restart_data_on_resize)
    if error is not None:  # the user asked for this step: no fallback
      raise StopError(f"train.restore_step={step}: the checkpoint {mngr.directory / str(step)} "
                      f"cannot be read ({error})")
    return restored
  problems = []
  for s in steps:
    restored, error = _restore_everywhere(mngr, s, abstract_state, data_iter,
                                          restart_data_on_resize)
    if error is not None:  # any unreadable file or metadata: name it, try the previous step
      problems.append(f"step {s}: {error}")
      if jax.process_index() == 0:
        log.warning("checkpoint %s cannot be read (%s); trying the previous one",
                    mngr.directory / str(s), error)
      continue
    if jax.process_index() == 0:   # a warning: absl shows nothing below it on the console
      skipped = ", ".join(p.split(":")[0] for p in problems)
      log.warning("resuming from step %d in %s%s", s, mngr.directory,
                  f"; skipped the unreadable {skipped}" if problems else "")
    if problems:
      _set_aside(mngr, [t for t in steps if t > s])
    return restored
  if problems:
    raise StopError(f"no checkpoint in {mngr.directory} can be read (" + "; ".join(problems)
                    + "); move the folder away to start afresh, or repair it")
  return None


def _restore_everywhere(mngr, step, abstract_state, data_iter, restart_data_on_resize):
  """(restored, None) when every process read `step`, else (None, why): the processes must
  resume from one step, and a file that only one of them reads (its shards, its data position)
  can fail on that one alone. Each failure is logged by its process."""
  try:
    restored, error = _restore(mngr, step, abstract_state, data_iter, restart_data_on_resize), None
  except ConfigError:
    raise
  except Exception as e:  # any unreadable file or metadata
    restored, error = None, _first_line(e)
    if jax.process_count() > 1:
      log.warning("process %d cannot read checkpoint %s (%s)", jax.process_index(),
                  mngr.directory / str(step), error)
      # Join the barrier that ends orbax's restore on the processes that succeeded (orbax
      # 0.12.8: Checkpointer.restore's last act, with the prefix "" a CheckpointManager gives
      # its checkpointer; a failure is raised before it), so that all meet in the gather below.
      multihost_utils.sync_global_devices(_RESTORE_BARRIER)
  if jax.process_count() > 1:
    failed = multihost_utils.process_allgather(np.asarray(error is not None, np.int32))
    if error is None and np.any(failed):
      restored, error = None, (f"unreadable on process(es) {np.flatnonzero(failed).tolist()} "
                               f"(see their log)")
  return restored, error


def _set_aside(mngr, steps) -> None:
  """Renames unreadable newer steps to <step>.unreadable (kept for inspection, no longer
  listed; process 0 renames, every process re-lists), so training on can save them again."""
  if jax.process_index() == 0:
    for s in steps:
      src, dst = mngr.directory / str(s), mngr.directory / f"{s}.unreadable"
      if dst.exists():
        dst = mngr.directory / f"{s}.unreadable.{os.getpid()}"
      src.rename(dst)
      log.warning("moved the unreadable checkpoint %s to %s", src, dst)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("checkpoints: unreadable steps set aside")
  mngr.reload()


def _restore(mngr, step, abstract_state, data_iter, restart_data_on_resize=False):
  items = {STATE: ocp.args.StandardRestore(abstract_state)}
  writers = data_writers(mngr.directory / str(step))
  resized = data_iter is not None and writers not in (None, jax.process_count())
  if resized and not restart_data_on_resize:
    raise ConfigError(
        f"checkpoint step {step} in {mngr.directory} was written by {writers} processes and this "
        f"run has {jax.process_count()}: each process's data position cannot be split another "
        f"way without repeating or skipping records; run with {writers} processes, or add "
        f"--config.train.restart_data_on_resize=True to keep the weights and optimizer state and "
        f"start a fresh pass over the data")
  if resized:
    log.warning("step %d was written by %d processes, this run has %d: weights and optimizer "
                "state restored, the data starts a fresh pass (train.restart_data_on_resize)",
                step, writers, jax.process_count())
  elif data_iter is not None:
    items[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  return step, restored[STATE], (restored[DATA] if DATA in items else data_iter)


def data_writers(step_dir) -> int | None:
  """How many processes saved the data position of a step (from data/process_<i>-of-<n>.json)."""
  names = [p.name for p in (epath.Path(step_dir) / DATA).glob("process_*-of-*.json")] \
      if (epath.Path(step_dir) / DATA).exists() else []
  counts = {int(n.rsplit("-of-", 1)[1].split(".")[0]) for n in names}
  return counts.pop() if len(counts) == 1 else None


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def abstract_with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def load_params(path: str, abstract_params=None, item: str = STATE, key: str | None = "ema_params"):
  """Reads one parameter tree (by default the EMA weights) from a checkpoint step or item dir.

  `path` may be a workdir (newest step is used), a checkpoints/<step> dir, an
  item directory written by orbax StandardSave, or a plain params dir (a bare
  parameter tree saved with StandardCheckpointer, as `--mode=import` writes),
  which is returned whole. Arrays come back as numpy on the host, whatever the
  mesh or the number of processes that wrote them.
  """
  p = epath.Path(path)
  in_step = False
  if (p / "checkpoints").exists():
    steps = sorted(int(s.name) for s in (p / "checkpoints").iterdir() if s.name.isdigit())
    if not steps:
      raise FileNotFoundError(f"{path}: the checkpoints folder holds no finished step")
    p = p / "checkpoints" / str(steps[-1])
  if (p / item).exists():
    p, in_step = p / item, True
  ckptr = ocp.StandardCheckpointer()
  # Host (numpy) arrays, whatever mesh and process count wrote them: a checkpoint from a pod
  # loads on a laptop (without a target orbax insists on the saving topology).
  host = jax.tree.map(lambda m: np.empty(m.shape, m.dtype),
                      ckptr.metadata(p.resolve()).item_metadata)
  restored = ckptr.restore(p.resolve(), host)
  if key is not None and not in_step and key not in restored and not _is_train_state(restored):
    return restored  # a plain params dir
  if key is not None:
    if key not in restored:
      raise KeyError(f"{p}: no {key!r} in checkpoint (has {sorted(restored)})")
    restored = restored[key]
  return restored


def _is_train_state(tree) -> bool:
  return isinstance(tree, dict) and bool({"params", "opt_state", "step"} & set(tree))


def check_params(params, template, what: str, needs: str) -> None:
  """Raises ConfigError (one line) unless `params` has exactly the paths and shapes of `template`.

  `template`: the tree the config builds (arrays or ShapeDtypeStructs); `what`: the loaded
  weights (e.g. "init_from=DIR"); `needs`: what decides the template (e.g. "config.model").
  Every missing, unexpected and mis-shaped parameter counts; the first few are named.
  """
  leaves = jax.tree_util.tree_leaves_with_path
  name = lambda p: jax.tree_util.keystr(p, simple=True, separator="/")
  want = {name(p): tuple(np.shape(x)) for p, x in leaves(template)}
  got = {name(p): tuple(np.shape(x)) for p, x in leaves(params)}
  problems = [f"missing {k}" for k in want if k not in got]
  problems += [f"unexpected {k}" for k in got if k not in want]
  problems += [f"{k} has shape {got[k]} but {needs} needs {want[k]}"
               for k in want if k in got and got[k] != want[k]]
  if problems:
    more = len(problems) - _SHOWN_PROBLEMS
    shown = "; ".join(problems[:_SHOWN_PROBLEMS]) + (f"; {more} more" if more > 0 else "")
    raise ConfigError(f"{what} does not match {needs} ({len(problems)} problem(s)): {shown}")
