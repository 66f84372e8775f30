"""--mode=compile (unidiffuser_jax/compile.py): the plan of a run, on the local CPU mesh and,
where libtpu is installed, on a v5e:2x2 topology; its estimate never trusts an absurd
cost model, and a compiler crash is one row of the report."""
import json
import os

import jax
import pytest

from configs import demo
from unidiffuser_jax import compile as compile_plan
from unidiffuser_jax import errors, perf, sharding, vocab
from unidiffuser_jax.models import uvit


def _tiny(**compile_kw):
  config = vocab.derive(demo.get_config("tiny"))
  config.mesh = dict(data=2, fsdp=4, tensor=1, num_devices=0)
  config.compile.update(dict(dict(isolate=False), **compile_kw))
  return config


def test_step_estimate_rejects_absurd_cost_model_times():
  """The issue's numbers: v5p, depth-30 laion step, 309.7 TFLOP and 1,829 GiB per chip-step."""
  v5p = dict(perf.CHIPS)["TPU v5p"]
  roof = perf.roofline_seconds(309.7e12, 1829 * 2**30, 0, v5p)
  assert roof["compute_s"] == pytest.approx(0.675, abs=0.001)
  assert roof["bound"] == "hbm" and roof["seconds"] == pytest.approx(0.710, abs=0.001)
  for bad in (-0.87, 0.36, float("nan")):
    seconds, source = compile_plan.step_estimate(bad, roof, "v5p peak")
    assert seconds == roof["seconds"] and source.startswith("roofline, hbm-bound"), source
  assert compile_plan.step_estimate(None, roof, "x")[1].endswith("XLA optimal_seconds missing)")
  assert compile_plan.step_estimate(0.9, roof, "x") == (0.9, "XLA cost_analysis optimal_seconds")


def test_collective_bytes_reads_result_shapes():
  hlo = """
  %ag = bf16[8,1536]{1,0} all-gather(bf16[2,1536]{1,0} %p), dimensions={0}
  %ars = (f32[4,4]{1,0}, f32[16]{0}) all-reduce-start(%a, %b), to_apply=%add
  %rs = f32[2,1536]{1,0} reduce-scatter(f32[8,1536]{1,0} %g), dimensions={0}
  %d = f32[8,1536]{1,0} dot(%x, %y)
  """
  assert compile_plan.collective_bytes(hlo) == 8 * 1536 * 2 + (16 + 16) * 4 + 2 * 1536 * 4


def test_chip_for_halves_a_compile_only_v4_core():
  class Dev:
    device_kind, num_cores = "TPU v4", 1
  assert perf.chip_for(Dev()).peak_flops == 275e12 / 2
  Dev.device_kind = "cpu"
  assert perf.chip_for(Dev()) is None


def test_without_libtpu_one_line_says_how_to_install(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(compile_plan, "libtpu_available", lambda: False)
  assert compile_plan.run(_tiny(topology="v5e:2x2"), str(tmp_path)) == []
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 1 and compile_plan.LIBTPU_INSTALL in out[0]


def _check_train_row(row, config, tmp_path):
  mesh = sharding.make_mesh(config.mesh)
  assert row["status"] == "ok" and row["fits"], row
  assert row["devices"] == 8 and row["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  m = row["memory"]
  assert m["arguments"] > 0 and m["temporaries"] > 0 and m["code"] >= 0
  assert m["peak"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"]
  model = uvit.from_config(config.model)
  assert row["model_flops"] == perf.uvit_train_flops(model, row["batch"])
  # XLA counts the U-ViT plus the encoders and the element-wise work: at least the analytic count
  assert 0.5 < row["model_flops_per_device"] / row["xla_flops_per_device"] < 1.05
  assert row["step_seconds"] > 0 and row["examples_per_s"] > 0
  assert 0 < row["mfu"] <= 1.0
  assert 0 < row["mfu_serial"] <= row["mfu"]  # no overlap: slower than the roofline's max
  assert row["batch"] % sharding._axis_size(mesh, sharding.BATCH_AXES) == 0
  with open(row["hlo"]) as f:
    assert f.read(9) == "HloModule"
  with open(tmp_path / "compile" / "report.json") as f:
    assert json.load(f)["rows"][0]["candidate"] == "train"


@pytest.mark.slow
def test_compile_mode_on_the_local_cpu_mesh(tmp_path, capsys):
  config = _tiny(sampler=True, sample_tasks=("t2i",), sample_batch=8)
  rows = compile_plan.run(config, str(tmp_path))
  _check_train_row(rows[0], config, tmp_path)
  assert rows[1]["candidate"] == "sample/t2i" and rows[1]["status"] == "ok"
  assert rows[1]["mfu"] is None and rows[1]["xla_flops_per_device"] > 0
  out = capsys.readouterr().out
  assert "[train]" in out and "FITS" in out and "analytic" in out and "MFU <=" in out
  # The same step against a 1 KiB memory is reported as not fitting, not a crash.
  small = _tiny(hbm_gib=2.0 ** -20)
  row = compile_plan.run(small, str(tmp_path / "small"))[0]
  assert row["status"] == "does not fit" and not row["fits"]
  assert "DOES NOT FIT" in capsys.readouterr().out


def test_a_compiler_crash_is_one_row(tmp_path, monkeypatch):
  """The child dies before writing its row (XLA's flag parser stops the process on an unknown
  flag; libtpu's failed CHECKs SIGABRT it the same way, reported as 'signal 6'); the parent
  reports the death and the compiler's last words, and goes on."""
  monkeypatch.setenv("XLA_FLAGS", "--xla_no_such_flag_for_the_test=1")
  row = compile_plan.run_isolated(_tiny(), compile_plan.Candidate("train"), "", str(tmp_path))
  assert row["status"] == "crashed"
  assert row["error"].startswith("compiler died (exit 1)"), row
  assert "Unknown flag in XLA_FLAGS: --xla_no_such_flag_for_the_test" in row["error"], row


# v4 topologies compile for whole chips (two TensorCores as one device, 32 GiB): libtpu's
# default is a device per core, and jax cannot make a mesh of those.
@pytest.mark.skipif(not compile_plan.libtpu_available(), reason="libtpu is not installed")
@pytest.mark.parametrize("topology,kind,hbm_gib", [("v5e:2x2", "TPU v5 lite", 16),
                                                   ("v4:2x2x1", "TPU v4", 32)])
def test_tiny_train_step_on_a_tpu_topology(tmp_path, topology, kind, hbm_gib):
  config = _tiny(topology=topology, isolate=True)
  config.mesh = dict(data=1, fsdp=4, tensor=1, num_devices=0)
  row = compile_plan.run(config, str(tmp_path))[0]
  assert row["status"] == "ok", row
  assert row["device_kind"] == kind and row["devices"] == 4
  assert row["memory"]["hbm"] == hbm_gib * 2**30
  assert 0 < row["mfu"] <= 1.0 and row["xla_flops_per_device"] > 0
  assert os.path.getsize(row["hlo"]) > 0
  assert jax.devices()[0].platform == "cpu"  # the test process itself stays on the CPU


@pytest.mark.skipif(not compile_plan.libtpu_available(), reason="libtpu is not installed")
def test_a_mesh_that_splits_torus_axes_is_refused_in_one_line():
  """v5p:4x4x4: fsdp=16 is two whole axes of the 4x4x4 torus; data=8 x fsdp=8 is not."""
  devices = compile_plan.devices_for("v5p:4x4x4")
  assert sharding.make_mesh(dict(data=4, fsdp=16, tensor=1), devices).shape["fsdp"] == 16
  with pytest.raises(errors.ConfigError, match=r"^config.mesh \{'data': 8, 'fsdp': 8, 'tensor': "
                     r"1\} cannot be laid out on these devices' torus: .*size 8"):
    sharding.make_mesh(dict(data=8, fsdp=8, tensor=1), devices)


@pytest.mark.skipif(not compile_plan.libtpu_available(), reason="libtpu is not installed")
def test_tiny_train_step_with_splash_attention_on_v5e_2x2(tmp_path):
  """The splash kernel compiles for TPU inside the real step (shard_map per device, Mosaic)."""
  config = _tiny(topology="v5e:2x2", isolate=True)
  config.mesh = dict(data=1, fsdp=4, tensor=1, num_devices=0)
  config.model.attention = "splash"
  row = compile_plan.run(config, str(tmp_path))[0]
  assert row["status"] == "ok", row
  with open(row["hlo"]) as f:
    assert "tpu_custom_call" in f.read()  # the Pallas kernel, not the interpreter's loops
