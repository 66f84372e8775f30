"""The serving queue (unidiffuser_jax/serve_queue.py) with a plain function for the model."""
import threading
import time

import pytest

from unidiffuser_jax import serve_queue


def test_batcher_groups_pads_cancels_and_survives_errors():
  ran, gate = [], threading.Event()

  def run_batch(group, requests):
    gate.wait(5)
    ran.append((group, [len(r.samples) for r in requests]))
    if group == "boom":
      raise RuntimeError("bad batch")
    for r in requests:
      r.records = [f"{group}:{s}" for s in r.samples]

  b = serve_queue.Batcher(run_batch, batch_size=4, max_wait_s=0.2, max_queued_samples=8)
  try:
    first = b.submit("a", [0])               # taken alone once its wait is over (gate closed)
    time.sleep(0.4)
    reqs = [b.submit("a", [1, 2]), b.submit("b", [3]), b.submit("a", [4]), b.submit("a", [5])]
    cancelled = b.submit("b", [6])
    b.cancel(cancelled)
    with pytest.raises(serve_queue.QueueFull):
      b.submit("a", [7, 8, 9, 10])           # 5 waiting + 4 > 8
    gate.set()
    for r in [first] + reqs:
      assert r.done.wait(5)
    assert first.records == ["a:0"] and reqs[0].records == ["a:1", "a:2"]
    # a's three waiting requests (4 samples) share one batch; b runs after, alone.
    assert ran[1] == ("a", [2, 1, 1]) and ran[2] == ("b", [1]), ran
    assert reqs[2].batch_requests == 3 and cancelled.state == "cancelled"
    bad = b.submit("boom", [0])
    assert bad.done.wait(5) and "bad batch" in bad.error
    ok = b.submit("a", [1])
    assert ok.done.wait(5) and ok.records == ["a:1"]   # the worker outlived the error
  finally:
    gate.set()
    b.close()


def test_batcher_start_failure_fails_requests_with_its_line():
  def start():
    raise OSError("no weights")
  b = serve_queue.Batcher(lambda g, rs: None, batch_size=2, max_wait_s=0.0,
                          max_queued_samples=4, start=start)
  try:
    r = b.submit("a", [0])
    assert r.done.wait(5) and "could not start: OSError: no weights" in r.error
  finally:
    b.close()
