"""Checkpoints: train state (params, EMA, optimizer), data iterator and config in one orbax step.

Layout in the workdir:
  checkpoints/<step>/state   sharded arrays (orbax StandardSave; async)
  checkpoints/<step>/data    grain iterator state, one JSON file per process
  checkpoints/<step>/config  the run's config as JSON (what produced these weights)
Saving the iterator with the state is what makes a resume see exactly the
records an unbroken run would have seen.
"""
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from unidiffuser_jax.errors import ConfigError

STATE, DATA, CONFIG = "state", "data", "config"
_SHOWN_PROBLEMS = 8  # check_params names this many mismatches, then counts the rest


def manager(workdir: str, *, keep: int, async_save: bool = True,
            with_data: bool = True) -> ocp.CheckpointManager:
  items = (STATE, DATA, CONFIG) if with_data else (STATE, CONFIG)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      enable_async_checkpointing=async_save,
      create=True,
  )
  path = epath.Path(workdir) / "checkpoints"
  return ocp.CheckpointManager(path.resolve() if "://" not in os.fspath(path) else path,
                               item_names=items, options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, config_dict: dict) -> bool:
  """Starts saving `step` (the caller decides when a step is due); async for the arrays."""
  items = {STATE: ocp.args.StandardSave(state), CONFIG: ocp.args.JsonSave(config_dict)}
  if data_iter is not None:
    items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
  return mngr.save(step, args=ocp.args.Composite(**items), force=True)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, data_iter):
  """Returns (step, state, data_iter) from the newest checkpoint, or None if there is none.

  `abstract_state` holds ShapeDtypeStructs with shardings, so every array is
  read straight into its sharded layout.
  """
  step = mngr.latest_step()
  if step is None:
    return None
  items = {STATE: ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    items[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  return step, restored[STATE], (restored[DATA] if data_iter is not None else None)


def abstract_with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def load_params(path: str, abstract_params=None, item: str = STATE, key: str | None = "ema_params"):
  """Reads one parameter tree (by default the EMA weights) from a checkpoint step or item dir.

  `path` may be a workdir (newest step is used), a checkpoints/<step> dir, an
  item directory written by orbax StandardSave, or a plain params dir (a bare
  parameter tree saved with StandardCheckpointer, as `--mode=import` writes),
  which is returned whole.
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
  restored = ocp.StandardCheckpointer().restore(p.resolve())
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
