"""--config.compile.search (search.py): candidates, pruning, the per-config cache and a
deterministic ranking. The compile itself is compile.py's (tests/test_compile.py); here a
stand-in returns rows so that the search logic is checked in milliseconds."""
import random

import jax
import pytest

from configs import demo
from unidiffuser_jax import search, vocab


def _tiny():
  config = vocab.derive(demo.get_config("tiny"))
  config.train.batch_size = 32   # micro-batches of 1..4 per shard on 8 devices
  config.compile.update(search=True, search_tensor=(1, 2), search_remat=("none", "block"),
                        search_accum=(1, 2))
  return config


def test_meshes_cover_the_devices_and_respect_the_heads():
  config = _tiny()
  got = search.meshes(8, config.model, (1, 2, 4, 3))
  assert all(d * f * t == 8 for d, f, t in got)
  assert {t for _, _, t in got} <= {1, 2, 4} and 3 not in {t for _, _, t in got}
  assert (1, 8, 1) in got and (2, 2, 2) in got and (8, 1, 1) in got
  assert len(got) == len(set(got))


def test_ranking_is_deterministic():
  rows = [dict(candidate=f"c{i}", status="ok", examples_per_s=float(i % 3)) for i in range(9)]
  rows.append(dict(candidate="x", status="does not fit"))
  want = [r["candidate"] for r in search.rank(rows)]
  assert want[:3] == ["c2", "c5", "c8"] and "x" not in want
  for seed in range(5):
    random.Random(seed).shuffle(rows)
    assert [r["candidate"] for r in search.rank(rows)] == want


def test_equal_throughput_is_ranked_by_the_no_overlap_estimate():
  """Compute-bound candidates share the overlapped roofline (the same examples/s); the one that
  moves fewer bytes (higher no-overlap MFU) ranks first."""
  rows = [dict(candidate="a", status="ok", examples_per_s=10.0, mfu_serial=0.60),
          dict(candidate="b", status="ok", examples_per_s=10.0, mfu_serial=0.70),
          dict(candidate="c", status="ok", examples_per_s=9.0, mfu_serial=0.90)]
  assert [r["candidate"] for r in search.rank(rows)] == ["b", "a", "c"]


def test_search_prunes_caches_and_prints_the_best(tmp_path):
  config = _tiny()
  calls = []

  def fake_compile(cfg, out_dir):
    """Memory grows with the micro-batch and without remat; speed prefers data parallelism."""
    calls.append(cfg.mesh.to_dict())
    micro = cfg.train.batch_size // (cfg.mesh.data * cfg.mesh.fsdp * cfg.train.grad_accum)
    peak = micro * (3 if cfg.model.remat == "none" else 1)
    if peak > 5:
      return dict(candidate="train", status="does not fit", error="RESOURCE_EXHAUSTED")
    speed = 100.0 * cfg.mesh.data + 10 * cfg.train.grad_accum + (cfg.model.remat == "none")
    return dict(candidate="train", status="ok", examples_per_s=speed, step_seconds=1 / speed,
                step_seconds_source="stand-in", mfu=0.5, memory=dict(peak=peak * 2**30))

  devices = jax.devices()
  rows = search.run(config, str(tmp_path), devices, 2.0**40, fake_compile)
  n_points = len(search.candidates(config, len(devices), 2.0**40)[0])
  assert 0 < len(calls) < n_points  # a micro-batch that did not fit skipped the larger ones
  skipped = [r for r in rows if "smaller micro-batch" in r.get("error", "")]
  assert skipped and all(r["status"] == "does not fit" for r in skipped)
  table = search.format_table(rows)
  best = search.rank(rows)[0]
  assert table.splitlines()[1].split()[1] == best["candidate"]
  assert "best: add --config.mesh.data=" in table and "--config.train.grad_accum=" in table

  calls.clear()
  again = search.run(config, str(tmp_path), devices, 2.0**40, fake_compile)
  assert calls == [] and search.format_table(again) == table   # cached: instant and identical

  # A memory limit below the state itself prunes every candidate before compiling.
  rows = search.run(config, str(tmp_path / "small"), devices, 1.0, fake_compile)
  assert calls == [] and rows and all("state alone" in r["error"] for r in rows)
  assert search.format_table(rows).endswith("no candidate fits")


@pytest.mark.parametrize("accum", [(3,)])
def test_accumulation_must_divide_the_per_shard_batch(accum):
  config = _tiny()
  config.compile.search_accum = accum
  points, _ = search.candidates(config, 8, 2.0**40)
  assert all((config.train.batch_size // (p.data * p.fsdp)) % p.accum == 0 for p in points)
