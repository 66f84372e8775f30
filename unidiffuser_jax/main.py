"""The one entry point: parse flags, check the config, dispatch on --mode.

  python -m unidiffuser_jax.main --config=configs/demo.py --workdir=DIR [--mode=train]
  python -m unidiffuser_jax.main --config=configs/laion.py --mode=describe
  python -m unidiffuser_jax.main --config=configs/laion.py --mode=compile --workdir=DIR \
      --config.compile.topology=v5p:4x4x4      # AOT plan: memory, FLOPs, step time, MFU
  any config value can be overridden: --config.train.steps=10

No logic lives here beyond choosing the job.
"""
import os
import sys

# Quieter TensorFlow (pulled in by tensorflow-datasets for --mode=eval's COCO) before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from unidiffuser_jax import hugepages  # noqa: E402  (no JAX: safe before the heavy imports)

if __name__ == "__main__":
  hugepages.reexec_if_wanted()   # malloc on huge pages: a faster CPU step (hugepages.py)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from unidiffuser_jax import jobs, multihost, preemption  # noqa: E402
from unidiffuser_jax.errors import ConfigError, StopError  # noqa: E402

MODES = ("train", "describe", "compile", "sample", "serve", "import", "export", "extract",
         "train_captioner", "eval")

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file (a runbook).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and outputs go.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "Which job to run.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first: one process per host on a TPU "
    "pod slice, a GPU cluster or launch/local.sh (coordinator from the environment; see launch/).")


def _run(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _MULTIHOST.value:
    multihost.initialize()
  # Library INFO chatter (orbax, absl) would bury the progress bar and the metric lines.
  logging.set_verbosity(logging.WARNING)
  config, mode, workdir = _CONFIG.value, _MODE.value, _WORKDIR.value
  if mode not in ("describe",) and not workdir:
    raise app.UsageError(f"--mode={mode} needs --workdir=DIR")
  jobs.run(mode, config, workdir)


def main() -> None:
  try:
    app.run(_run, flags_parser=_parse_flags)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except StopError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except preemption.Preempted as e:
    print(e, file=sys.stderr, flush=True)
    sys.exit(0)


def _parse_flags(argv):
  """absl's parser, with bad config overrides turned into one clear line."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections reports an unknown override key as AttributeError("'key'\nDid you mean...").
    text = str(e.args[0] if isinstance(e, AttributeError) and e.args else e)
    text = text.replace("\\n", " ").replace("\n", " ").replace("\\", "").strip("'\" ")
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    print(f"error: bad command-line config {' '.join(bad) or ''}: {text} "
          f"(keys and value types must match the config file's get_config())", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
