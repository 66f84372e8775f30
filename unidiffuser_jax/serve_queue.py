"""The serving queue: concurrent requests of one kind grouped into the compiled fixed-size batch.

A request asks for `len(samples)` samples of one kind (a hashable group key: the task and its
compiled settings). One worker thread runs one batch at a time: it picks the group whose oldest
request waited longest, waits until that group fills a batch or its oldest request has waited
`max_wait_s`, then hands whole requests (in arrival order, as many as fit in `batch_size`
samples) to run_batch(group, requests), which pads to the batch size (the compiled shape) and
fills each request's `records`. Cancelled requests are dropped before they run; a request
cancelled while its batch runs gets its result discarded. An error in run_batch fails that
batch's requests, not the worker.

Knows nothing of gradio or jax (tests drive it with a plain function).
"""
from collections.abc import Callable, Hashable
import dataclasses
import itertools
import logging
import threading
import time

log = logging.getLogger(__name__)


class QueueFull(Exception):
  """More samples are waiting than the queue holds."""


@dataclasses.dataclass(eq=False)
class Request:
  group: Hashable
  samples: list                       # one entry per sample, as run_batch reads them
  id: int = dataclasses.field(default_factory=itertools.count().__next__)
  created: float = dataclasses.field(default_factory=time.monotonic)
  started: float | None = None        # when its batch started
  finished: float | None = None
  batch_requests: int = 0             # how many requests shared its batch
  records: list | None = None
  error: str | None = None
  cancelled: bool = False
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  on_done: list = dataclasses.field(default_factory=list)   # called (no args) once done

  def finish(self) -> None:
    self.finished = time.monotonic()
    self.done.set()
    for fn in self.on_done:
      fn()

  @property
  def state(self) -> str:
    if self.done.is_set():
      return "cancelled" if self.cancelled else ("error" if self.error else "done")
    return "running" if self.started is not None else "queued"


class Batcher:
  """run_batch(group, requests) -> None fills requests' records; see the module docstring."""

  def __init__(self, run_batch: Callable, batch_size: int, max_wait_s: float,
               max_queued_samples: int, start: Callable | None = None):
    """start(): run first by the worker (compiling the programs) while requests queue."""
    self._run_batch, self._bsz, self._max_wait = run_batch, int(batch_size), float(max_wait_s)
    self._max_queued, self._start = int(max_queued_samples), start
    self.start_error: str | None = None
    self._pending: list[Request] = []
    self._cv = threading.Condition()
    self._stop = False
    self.running: list[Request] = []
    self.batches: list[tuple[Hashable, int, int]] = []   # (group, requests, samples) per batch
    self._thread = threading.Thread(target=self._loop, name="serve-batcher", daemon=True)
    self._thread.start()

  def submit(self, group: Hashable, samples: list) -> Request:
    if not 1 <= len(samples) <= self._bsz:
      raise ValueError(f"a request holds 1 to {self._bsz} samples, got {len(samples)}")
    req = Request(group, samples)
    with self._cv:
      queued = sum(len(r.samples) for r in self._pending)
      if queued + len(samples) > self._max_queued:
        raise QueueFull(f"the server is busy ({queued} samples waiting); try again shortly")
      self._pending.append(req)
      self._cv.notify_all()
    return req

  def cancel(self, req: Request) -> None:
    with self._cv:
      req.cancelled = True
      if req in self._pending:
        self._pending.remove(req)
        req.finish()

  def queued_ahead(self, req: Request) -> int:
    """Samples waiting before `req` (any group), plus those running now."""
    with self._cv:
      ahead = 0
      for r in self._pending:
        if r is req:
          break
        ahead += len(r.samples)
      return ahead + sum(len(r.samples) for r in self.running)

  def close(self) -> None:
    with self._cv:
      self._stop = True
      self._cv.notify_all()
    self._thread.join(timeout=5)

  def _take(self) -> list[Request] | None:
    """Under the lock: the next batch's requests once it is full or its wait is over."""
    while not self._stop:
      if not self._pending:
        self._cv.wait()
        continue
      group = self._pending[0].group         # the oldest request's group goes first
      members = [r for r in self._pending if r.group == group]
      waited = time.monotonic() - members[0].created
      if sum(len(r.samples) for r in members) < self._bsz and waited < self._max_wait:
        self._cv.wait(self._max_wait - waited)
        continue
      batch, n = [], 0
      for r in members:
        if n + len(r.samples) <= self._bsz:
          batch.append(r)
          n += len(r.samples)
      for r in batch:
        self._pending.remove(r)
      return batch
    return None

  def _loop(self) -> None:
    if self._start is not None:
      try:
        self._start()
      except Exception as e:   # every request then fails with this line
        log.exception("serving start-up failed")
        self.start_error = f"the server could not start: {type(e).__name__}: {e}"
    while True:
      with self._cv:
        batch = self._take()
        if batch is None:
          return
        self.running = batch
      now = time.monotonic()
      for r in batch:
        r.started, r.batch_requests = now, len(batch)
      try:
        if self.start_error:
          raise RuntimeError(self.start_error)
        self._run_batch(batch[0].group, batch)
      except Exception as e:   # one bad batch fails its requests, never the server
        log.exception("serving batch failed")
        for r in batch:
          r.error = f"generation failed: {type(e).__name__}: {e}"
      with self._cv:
        self.running = []
        self.batches.append((batch[0].group, len(batch), sum(len(r.samples) for r in batch)))
      for r in batch:
        r.finish()
