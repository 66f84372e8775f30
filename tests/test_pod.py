"""Pod behaviour on one machine with real processes: launch/local.sh's N processes against one,
SIGTERM (preemption) in one and in two processes, the SIGKILL drill (tools/faults.py), elastic
restore across process counts and the processes' agreement on the step they resume from.

One unbroken single-process run and one unbroken two-process run (module fixtures) are the
references of every test; all runs share one compilation cache, so only the first run of each
process count compiles (the programs are the same ones, so the numbers are too)."""
import os
import random
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import psutil
import pytest

from configs import demo
from tools import faults
from unidiffuser_jax import checkpoints, errors, input_pipeline
from unidiffuser_jax import sharding, train, vocab

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

STEPS = 20
# The preemption tests start from the unbroken run's checkpoint of step HALF (half the steps to
# train; a run resumed from a checkpoint is preempted like a fresh one) and must end as it did.
HALF = STEPS // 2
LOCAL = (os.path.join(faults.ROOT, "launch", "local.sh"),)


def _launcher(n):
  return (*LOCAL, str(n))


@pytest.fixture(scope="module")
def args(tmp_path_factory):
  """The trainer's arguments: the tiny config, STEPS steps, the module's compilation cache."""
  cache = tmp_path_factory.mktemp("compile_cache")
  return [*faults.TINY, f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=5",
          f"--config.compile.cache_dir={cache}"]


@pytest.fixture(scope="module")
def one_process(args, tmp_path_factory):
  d = str(tmp_path_factory.mktemp("one"))
  run = faults.Run(d, args, d + ".log")
  assert run.wait() == 0, run.text()[-3000:]
  return d


@pytest.fixture(scope="module")
def two_processes(args, tmp_path_factory):
  d = str(tmp_path_factory.mktemp("two"))
  run = faults.Run(d, args, d + ".log", launcher=_launcher(2))
  assert run.wait() == 0, run.text()[-3000:]
  return d, run.text()


def test_two_processes_train_exactly_as_one(one_process, two_processes):
  two, text = two_processes
  # Both processes ran and spoke, each with its prefix; one TensorBoard writer (process 0).
  assert "[p0] step      20 |" in text and "[p1] step      20 |" in text
  assert len([f for f in os.listdir(two) if f.startswith("events.out")]) == 1
  # Each process wrote its own iterator state and its own array shards.
  step_dir = os.path.join(two, "checkpoints", str(STEPS))
  assert sorted(os.listdir(os.path.join(step_dir, "data"))) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(os.path.join(step_dir, "state")))
  losses_one, losses_two = faults.logged(one_process), faults.logged(two)
  assert sorted(losses_one) == sorted(losses_two) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([losses_two[s] for s in sorted(losses_two)],
                             [losses_one[s] for s in sorted(losses_one)], rtol=0, atol=1e-6)
  assert faults.max_abs_diff(faults.final_state(one_process), faults.final_state(two)) <= 1e-6


def _from_step(reference, workdir, step):
  """A workdir holding only `reference`'s checkpoint of `step` (a run resumes from there)."""
  os.makedirs(os.path.join(workdir, "checkpoints"))
  shutil.copytree(os.path.join(reference, "checkpoints", str(step)),
                  os.path.join(workdir, "checkpoints", str(step)))
  return workdir


def _preempt_and_resume(workdir, args, launcher, target, stop_at):
  """SIGTERM once `stop_at` is logged (twice: the second lands during the save), then rerun."""
  run = faults.Run(workdir, args, workdir + ".log", launcher=launcher)
  assert run.wait_for_step(stop_at, timeout=1800), run.text()[-3000:]
  t0 = time.monotonic()
  for _ in range(2):
    os.kill(target(run), signal.SIGTERM)
    time.sleep(0.2)
  rc = run.wait(timeout=120)
  took = time.monotonic() - t0
  text = run.text()
  assert rc == 0, text[-3000:]
  assert took < 30, took    # the default grace (train.preemption_grace_s)
  line = [l for l in text.splitlines() if "preempted: stopped at step" in l]
  assert line and "re-run the same command to resume" in line[-1], text[-2000:]
  stopped = int(line[-1].split("stopped at step ")[1].split()[0])
  assert stop_at <= stopped < STEPS and stopped in faults.complete_steps(workdir)
  assert not faults.interrupted(workdir)
  rerun = faults.Run(workdir, args, workdir + ".2.log", launcher=launcher)
  assert rerun.wait() == 0, rerun.text()[-3000:]
  assert faults.resumed_from(rerun.text()) == stopped
  return stopped


def test_sigterm_single_process_stops_cleanly_and_resumes_bitwise(one_process, args, tmp_path):
  stop_at = random.Random(os.getpid()).randint(HALF + 1, STEPS - 5)
  w = _from_step(one_process, str(tmp_path / "w"), HALF)
  _preempt_and_resume(w, args, (), lambda run: run.proc.pid, stop_at)
  assert faults.resumed_from(open(w + ".log").read()) == HALF
  assert faults.max_abs_diff(faults.final_state(w), faults.final_state(one_process)) == 0.0


def _trainer(launcher_proc, process_id):
  """The pid of trainer process `process_id` under launch/local.sh."""
  for child in psutil.Process(launcher_proc.pid).children(recursive=True):
    try:
      if (child.environ().get("JAX_PROCESS_ID") == str(process_id)
          and "unidiffuser_jax.main" in child.cmdline()):
        return child.pid
    except psutil.Error:
      continue
  raise LookupError(f"no trainer process {process_id} under {launcher_proc.pid}")


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(two_processes, args, tmp_path):
  stop_at = random.Random(os.getpid() + 1).randint(HALF + 1, STEPS - 6)
  w = _from_step(two_processes[0], str(tmp_path / "w"), HALF)
  _preempt_and_resume(w, args, _launcher(2), lambda run: _trainer(run.proc, 1), stop_at)
  text = open(w + ".log").read()
  assert faults.resumed_from(text) == HALF
  assert "[p0] preempted: stopped at step" in text and "[p1] preempted: stopped at step" in text
  assert faults.max_abs_diff(faults.final_state(w), faults.final_state(two_processes[0])) <= 1e-6


def test_sigkill_drill_resumes_only_complete_checkpoints(one_process, args, tmp_path):
  # The unbroken reference is the module's single-process run (the same steps; it saved every
  # 5 steps, the drill every 3: saving does not change the training, so bitwise equal).
  record = faults.kill_drill(str(tmp_path / "drill"), one_process, rounds=2, steps=STEPS, seed=1,
                             args=args[-1:])
  assert not record["violations"], record
  assert record["killed"] >= 1 and record["max_abs_diff"] == 0.0


def test_launcher_reports_the_worst_exit_status(tmp_path):
  res = subprocess.run([*_launcher(2), "--config=configs/demo.py:tiny", "--config.train.nope=1",
                        f"--workdir={tmp_path}"], cwd=faults.ROOT, capture_output=True,
                       text=True, timeout=300)
  assert res.returncode == 2, res.stderr[-2000:]
  assert "[p0] error: bad command-line config" in res.stderr
  assert "[p1] error: bad command-line config" in res.stderr


def test_a_two_process_checkpoint_restores_into_one_process_on_another_mesh(two_processes,
                                                                             tmp_path):
  """Elastic restore: 2 processes x fsdp=8 -> 1 process x (data=2, fsdp=4). The arrays reshard;
  the data position (one per process) is refused unless train.restart_data_on_resize."""
  w = tmp_path / "w"
  shutil.copytree(two_processes[0], w)
  config = vocab.derive(demo.get_config("tiny"))
  config.mesh.update(data=2, fsdp=4)
  mesh = sharding.make_mesh(config.mesh)
  built = train.build(config, mesh, abstract=True)
  abstract = checkpoints.abstract_with_shardings(built.state, built.state_shardings)
  it = input_pipeline.make_train_iterator(config, config.train, 0, 1)
  mngr = checkpoints.manager(str(w), keep=3)
  with pytest.raises(errors.ConfigError, match=r"step 20 .* was written by 2 processes and this "
                     r"run has 1: .*--config.train.restart_data_on_resize=True"):
    checkpoints.restore_latest(mngr, abstract, it)
  step, restored, it_after = checkpoints.restore_latest(mngr, abstract, it,
                                                        restart_data_on_resize=True)
  assert step == STEPS and it_after is it
  saved = faults.final_state(two_processes[0])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), saved["params"])
  leaf = jax.tree.leaves(restored.params)[0]
  assert leaf.sharding.mesh.shape == {"data": 2, "fsdp": 4, "tensor": 1}


def test_a_one_process_checkpoint_restores_into_two_processes(one_process, two_processes, args,
                                                              tmp_path):
  """Elastic restore, growing: 1 process x 8 devices -> 2 processes x 4, one more step (the
  shrinking direction, 2 -> 1, is the test above; two processes rather than four: the same
  code paths, and the two-process program is already in the module's compilation cache, where
  four processes took 80-125 s on 2 cores). The step
  starts from exactly the saved state: its EMA is 0.1 x its params + 0.9 x the saved EMA
  (ema_decay 0.9), and its params moved from the saved ones by one Adam step (<= a few lr)."""
  w = str(tmp_path / "w")
  shutil.copytree(one_process, w)
  n = 2
  grow = [*args, f"--config.train.steps={STEPS + 1}", "--config.train.restart_data_on_resize=True"]
  run = faults.Run(w, grow, w + ".log", launcher=_launcher(n))
  assert run.wait() == 0, run.text()[-3000:]
  text = run.text()
  assert faults.resumed_from(text) == STEPS
  for p in range(n):
    assert f"[p{p}] " in text and f"written by 1 processes, this run has {n}" in text
  before, after = faults.final_state(one_process), faults.final_state(w)
  assert int(after["step"]) == STEPS + 1
  jax.tree.map(lambda e1, p1, e0: np.testing.assert_allclose(e1, 0.1 * p1 + 0.9 * e0, rtol=1e-5,
                                                             atol=1e-6),
               after["ema_params"], after["params"], before["ema_params"])
  lr = demo.get_config("tiny").train.lr
  assert 0 < faults.max_abs_diff(after["params"], before["params"]) <= 5 * lr


def test_processes_agree_on_the_step_when_only_one_cannot_read_it(two_processes, args, tmp_path):
  """Process 1's data position of the newest step is garbage, process 0's is fine: both must
  skip that step and resume from the previous one (alone, process 0 would take the newest and
  the two would train different steps), and the run ends as the unbroken one."""
  w = str(tmp_path / "w")
  shutil.copytree(two_processes[0], w)
  with open(os.path.join(w, "checkpoints", str(STEPS), "data", "process_1-of-2.json"), "w") as f:
    f.write("{not json")
  run = faults.Run(w, args, w + ".log", launcher=_launcher(2))
  assert run.wait(timeout=600) == 0, run.text()[-3000:]
  text = run.text()
  p1 = [l for l in text.splitlines() if l.startswith("[p1] ") and "cannot read checkpoint" in l]
  assert p1 and f"/checkpoints/{STEPS} (" in p1[0], text[-3000:]
  assert "cannot be read (unreadable on process(es) [1]" in text, text[-3000:]
  assert faults.resumed_from(text) == STEPS - 5
  assert os.path.isdir(os.path.join(w, "checkpoints", f"{STEPS}.unreadable"))
  assert faults.max_abs_diff(faults.final_state(w), faults.final_state(two_processes[0])) <= 1e-6
