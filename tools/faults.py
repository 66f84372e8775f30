"""Fault drills on real trainer processes: SIGKILL at random moments (then restart), SIGTERM.

  python -m tools.faults --rounds=20 --workdir=workdirs/faults         # by hand (benchmarks/README.md)
  (tests/test_pod.py runs kill_drill with 2 rounds)

Each round starts the tiny config (configs/demo.py:tiny, a checkpoint every 3 steps) in the same
workdir, lets it train for a random moment (a fifth of the rounds are killed during start-up,
at the latest when the first new step is logged; the others a moment after a random step 1-8
steps past the resume point) and kills it with SIGKILL, often in the middle of an async
checkpoint write. Before each restart it lists the complete steps (digit directories with
commit_success.txt) and the interrupted ones (orbax tmp dirs); the restart must resume from the
newest complete step, never from an interrupted one. A last run finishes the training, and its
final state (params, EMA, optimizer state) must equal, bitwise, an unbroken run's.
The helpers (Run, complete_steps, final_state) are shared with tests/test_pod.py.
"""
import argparse
import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ("--config=configs/demo.py:tiny", "--config.train.log_every=1")
_STEP = re.compile(r"step\s+(\d+) \|")
_RESUMED = re.compile(r"resuming from step (\d+) in ")


class Run:
  """One trainer process (or a launcher of several), its output in a log file."""

  def __init__(self, workdir: str, args, log_path: str, launcher=(), devices: int = 8):
    self.log_path = log_path
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [*launcher] if launcher else [sys.executable, "-m", "unidiffuser_jax.main"]
    self._log = open(log_path, "w")
    # A new session: a signal to the launcher's group reaches every trainer process.
    self.proc = subprocess.Popen([*cmd, f"--workdir={workdir}", *args], cwd=ROOT, env=env,
                                 stdout=self._log, stderr=subprocess.STDOUT,
                                 start_new_session=True)

  def text(self) -> str:
    with open(self.log_path, errors="replace") as f:
      return f.read()

  def last_step(self) -> int:
    return max((int(m) for m in _STEP.findall(self.text())), default=0)

  def wait_for_step(self, step: int, timeout: float = 600) -> bool:
    """Waits until a console line reports `step` (True) or the process ends (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
      if self.last_step() >= step:
        return True
      if self.proc.poll() is not None:
        return False
      time.sleep(0.05)
    raise TimeoutError(f"no step {step} within {timeout} s; log: {self.log_path}")

  def signal(self, sig, group: bool = False) -> None:
    if self.proc.poll() is None:
      (os.killpg if group else os.kill)(self.proc.pid, sig)

  def wait(self, timeout: float = 900) -> int:
    try:
      return self.proc.wait(timeout)
    finally:
      self._log.close()


def complete_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()
                and os.path.exists(os.path.join(d, n, "commit_success.txt"))) if os.path.isdir(d) else []


def interrupted(workdir: str) -> list[str]:
  return sorted(os.path.basename(p) for p in glob.glob(os.path.join(workdir, "checkpoints", "*tmp*")))


def resumed_from(log_text: str) -> int | None:
  m = _RESUMED.findall(log_text)
  return int(m[-1]) if m else None


def final_state(workdir: str):
  """The newest checkpoint's whole train state as numpy arrays."""
  from unidiffuser_jax import checkpoints  # local: a plain `--help` needs no jax
  import jax
  return jax.tree.map(np.asarray, checkpoints.load_params(workdir, key=None))


def logged(workdir: str, tag: str = "loss") -> dict[int, float]:
  """{step: value} of one scalar from every TensorBoard events file in the workdir (float32 as
  written; a resumed run's file overrides an earlier one's steps)."""
  from tensorboard.backend.event_processing import event_accumulator as ea
  from tensorboard.util import tensor_util
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    acc = ea.EventAccumulator(path, size_guidance={ea.TENSORS: 0})
    acc.Reload()
    if tag in acc.Tags()["tensors"]:
      out.update({e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)})
  return out


def max_abs_diff(a, b) -> float:
  import jax
  diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(
      np.asarray(x, np.float64) - np.asarray(y, np.float64)))) if np.size(x) else 0.0, a, b))
  return max(diffs)


def kill_drill(workdir: str, reference: str, *, rounds: int, steps: int, seed: int = 0,
               args=(), log=print) -> dict:
  """SIGKILL `rounds` times, restart each time, finish; returns the record of every round."""
  rng = random.Random(seed)
  train_args = [*TINY, f"--config.train.steps={steps}", "--config.train.checkpoint_every=3",
                "--config.train.keep_checkpoints=3", *args]
  os.makedirs(workdir, exist_ok=True)
  record = {"rounds": [], "violations": []}
  for r in range(rounds + 1):
    before, partial = complete_steps(workdir), interrupted(workdir)
    run = Run(workdir, train_args, os.path.join(workdir, f"round{r:03d}.log"))
    last = r == rounds
    if not last:
      if rng.random() < 0.2:                   # during start-up / restore / compile: a random
        try:                                   # moment, at the latest the first new step
          run.wait_for_step(max(before, default=0) + 1, timeout=rng.uniform(0.5, 15.0))
        except TimeoutError:
          pass
      elif run.wait_for_step(max(before, default=0) + rng.randint(1, 8)):
        time.sleep(rng.uniform(0.0, 1.0))      # while training and saving (every 3 steps)
      run.signal(signal.SIGKILL)
    rc = run.wait()
    text = run.text()
    resumed = resumed_from(text)
    entry = {"round": r, "complete_before": before, "interrupted_before": partial,
             "resumed_from": resumed, "last_step_seen": run.last_step(), "rc": rc}
    if resumed is not None and (resumed not in before or resumed != max(before)):
      record["violations"].append(f"round {r} resumed from step {resumed}; complete: {before}")
    if resumed is None and before and ("Traceback" in text or run.last_step() > 0):
      record["violations"].append(f"round {r} started afresh although {before} were complete")
    record["rounds"].append(entry)
    log(json.dumps(entry))
    if last and rc != 0:
      record["violations"].append(f"the final run failed (rc={rc}): {text[-2000:]}")
    if not last and rc == 0:   # the run finished before the kill: nothing left to interrupt
      break
  record["killed"] = sum(1 for e in record["rounds"] if e["rc"] == -signal.SIGKILL)
  record["mid_save"] = sum(1 for e in record["rounds"][1:] if e["interrupted_before"])
  if not record["violations"]:
    if not complete_steps(reference) or steps not in complete_steps(reference):
      ref = Run(reference, train_args, os.path.join(os.path.dirname(reference) or ".",
                                                    "reference.log"))
      assert ref.wait() == 0, ref.text()[-3000:]
    diff = max_abs_diff(final_state(workdir), final_state(reference))
    record["max_abs_diff"] = diff
    if diff != 0.0:
      record["violations"].append(f"final state differs from the unbroken run by {diff}")
  return record


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a fresh folder (the drill and its reference)")
  p.add_argument("--rounds", type=int, default=20)
  p.add_argument("--steps", type=int, default=0, help="train steps (0: 6 per round + 30)")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  steps = a.steps or 6 * a.rounds + 30
  t0 = time.time()
  record = kill_drill(os.path.join(a.workdir, "drill"), os.path.join(a.workdir, "reference"),
                      rounds=a.rounds, steps=steps, seed=a.seed)
  print(f"{record['killed']} SIGKILLs survived ({record['mid_save']} left an interrupted save), "
        f"{steps} steps, final state max |diff| vs unbroken: {record.get('max_abs_diff')}; "
        f"violations: {record['violations'] or 'none'}; {time.time() - t0:.0f} s")
  sys.exit(1 if record["violations"] else 0)


if __name__ == "__main__":
  main()
