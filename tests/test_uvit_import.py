"""Importing released-layout U-ViT files cannot silently build the wrong model.

Every file here is written by diffusers' UniDiffuserModel (renamed to the thu-ml layout by
test_uvit_parity's tables) for each combination of latent size (8, 16, 64), text tokens (12, 77),
version (v0, v1) and width (64, 128), depth 1. The import must infer the model the file holds,
name each field in which a config differs (import and the sample/export/fine-tune check alike),
refuse a position table it cannot split, and print flags that, applied as printed, sample and
export a file diffusers loads strictly.
"""
import functools
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from configs import demo
from data_pipelines import demo_data
from tests.refs import released
from tests.refs import uvit as uvit_ref
from unidiffuser_jax import sample, train, vocab, weight_jobs
from unidiffuser_jax.weights import uvit as wuvit
from unidiffuser_jax.weights.tensors import load_metadata, load_tensors
from unidiffuser_jax.models import uvit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMBOS = list(itertools.product((8, 16, 64), (12, 77), ("v0", "v1"), (64, 128)))
IDS = [f"latent{a}-text{b}-{c}-width{d}" for a, b, c, d in COMBOS]


def _file_model(latent, text, version, width, **kw) -> dict:
  """Our UViT fields of a test file (diffusers' MLP is 4x its width)."""
  return dict(uvit_ref.CFG, version=version, num_data_types=2, latent_size=latent,
              num_text_tokens=text, width=width, num_heads=4, mlp_dim=4 * width, depth=1, **kw)


@functools.lru_cache(maxsize=None)
def _released(latent, text, version, width, **kw) -> dict:
  """Released-layout tensors of a random diffusers UniDiffuserModel (do not modify)."""
  cfg = _file_model(latent, text, version, width, **kw)
  torch_model = uvit_ref.torch_model(version, cfg=cfg)
  return uvit_ref.diffusers_to_released(torch_model.state_dict(), version, depth=cfg["depth"])


def _config(**model):
  c = released.config()
  c.model.update(model)
  return c


def _names(diffs) -> list[str]:
  return [k for k, _, _ in diffs]


def _in_order(keys) -> list[str]:
  return [k for k in wuvit.GEOMETRY if k in keys]


# A config that differs from every test file in every field the file decides.
UNLIKE = dict(latent_size=32, latent_channels=8, patch_size=4, width=48, depth=4, num_heads=4,
              mlp_dim=100, text_dim=3, clip_img_dim=5)


@pytest.mark.parametrize("latent,text,version,width", COMBOS, ids=IDS)
def test_import_infers_the_file_model(latent, text, version, width):
  tensors = _released(latent, text, version, width)
  want = _file_model(latent, text, version, width)
  other = "v1" if version == "v0" else "v0"
  # The text-token count is the split's anchor: the config's, or CLIP's 77.
  config = _config(**UNLIKE, version=other, num_text_tokens=5 if text == 77 else text)
  plan = weight_jobs.plan_uvit_import(config, tensors, "f.pth")
  assert plan["model"] == want
  assert _names(plan["diffs"]) == _in_order(
      {"version", "latent_size", "latent_channels", "patch_size", "width", "depth", "mlp_dim",
       "text_dim", "clip_img_dim"} | ({"num_text_tokens"} if text == 77 else set()))
  assert any(n.startswith("num_heads 4 is not stored in the file") for n in plan["notes"])
  if text == 12:  # neither the config's 5 nor 77 text tokens fit: refused, in one line
    with pytest.raises(weight_jobs.WeightJobError) as e:
      weight_jobs.plan_uvit_import(_config(**UNLIKE, num_text_tokens=5), tensors, "f.pth")
    msg = str(e.value)
    assert "\n" not in msg and "--config.model.num_text_tokens" in msg
    assert "no split has the config's 5 or CLIP's 77 text tokens" in msg


# Each test file meets a config that differs from it in these fields (one or two at a time).
MUTATIONS = dict(
    version=lambda m: "v1" if m["version"] == "v0" else "v0",
    latent_size=lambda m: 2 * m["latent_size"],
    latent_channels=lambda m: 8,
    patch_size=lambda m: 4,
    width=lambda m: m["width"] + 32,
    depth=lambda m: 3,
    num_heads=lambda m: 2,
    mlp_dim=lambda m: m["mlp_dim"] + 4,
    text_dim=lambda m: 9,
    num_text_tokens=lambda m: 5,  # 77-token files only (77 anchors the split)
    clip_img_dim=lambda m: 11,
    num_data_types=lambda m: 3,  # v1 only
)


def _mutated_fields(i: int, want: dict) -> set[str]:
  keys = list(MUTATIONS)
  fields = {keys[i % len(keys)]} | ({keys[(7 * i + 3) % len(keys)]} if i % 2 else set())
  if want["num_text_tokens"] != 77:
    fields.discard("num_text_tokens")
  if want["version"] != "v1":
    fields.discard("num_data_types")
  return fields or {"width"}


@pytest.mark.parametrize("i", range(len(COMBOS)), ids=IDS)
def test_a_mismatched_config_names_exactly_its_fields(i, tmp_path):
  tensors = _released(*COMBOS[i])
  want = _file_model(*COMBOS[i])
  assert weight_jobs.plan_uvit_import(_config(**want), tensors, "f.pth")["diffs"] == []
  fields = _mutated_fields(i, want)
  changed = {k: MUTATIONS[k](want) for k in fields}
  plan = weight_jobs.plan_uvit_import(_config(**{**want, **changed}), tensors, "f.pth")
  # num_heads is not in the file: the import keeps the config's (and says so), no mismatch.
  assert _names(plan["diffs"]) == _in_order(fields - {"num_heads"})
  assert plan["model"] == {**want, **({"num_heads": 2} if "num_heads" in fields else {})}
  # Sample / export / fine-tune: import.json's model against the current config, every field.
  (tmp_path / "uvit").mkdir()
  (tmp_path / "import.json").write_text(json.dumps({"uvit": dict(path="/elsewhere/uvit",
                                                                 model=want)}))
  config = _config(**{**want, **changed})
  with pytest.raises(weight_jobs.WeightJobError) as e:
    weight_jobs.check_imported_uvit(uvit.from_config(config.model), str(tmp_path / "uvit"),
                                    "sample.checkpoint")
  msg = str(e.value)
  assert "\n" not in msg and "config.sample.checkpoint" in msg
  fixes = [a for a in msg.split() if a.startswith("--config.model.")]
  assert _in_order({f.split("=")[0].rsplit(".", 1)[1] for f in fixes}) == _in_order(fields)
  for f in fixes:  # the flags it prints fix it
    k, v = f[len("--config.model."):].split("=")
    config.model[k] = type(want[k])(v)
  weight_jobs.check_imported_uvit(uvit.from_config(config.model), str(tmp_path / "uvit"),
                                  "sample.checkpoint")


@pytest.mark.parametrize("latent", (8, 16, 64))
def test_the_reported_case_is_refused_or_right(latent):
  """A 77-token file and a config with 12 text tokens: 96 rows also fit 12 tokens with an
  18x18 latent (and 1104 rows 12 tokens with 66x66): refused, naming both; never imported as
  12 tokens. Where only 77 fits (latent 16), the file's model is inferred."""
  tensors = _released(latent, 77, "v1", 64)
  config = _config(**{**_file_model(latent, 77, "v1", 64), "num_text_tokens": 12})
  if latent == 16:
    plan = weight_jobs.plan_uvit_import(config, tensors, "f.pth")
    assert plan["model"]["num_text_tokens"] == 77 and plan["model"]["latent_size"] == 16
    assert plan["diffs"] == [("num_text_tokens", 77, 12)]
    return
  with pytest.raises(weight_jobs.WeightJobError) as e:
    weight_jobs.plan_uvit_import(config, tensors, "f.pth")
  msg = str(e.value)
  wrong = 18 if latent == 8 else 66
  assert "\n" not in msg
  assert (f"it fits 12 text tokens with latent_size {wrong} or 77 text tokens with latent_size "
          f"{latent}") in msg
  assert "--config.model.latent_size" not in msg  # nothing that only moves the error


@pytest.mark.multiprocess
def test_ambiguous_file_is_refused_by_the_cli_in_one_line(tmp_path):
  """configs/demo.py (12 text tokens, latent 8) meets a 77-token file of latent 8."""
  path = released.torch_save(_released(8, 77, "v1", 64), tmp_path / "uvit_v1.pth")
  proc = subprocess.run(
      [sys.executable, "-m", "unidiffuser_jax.main", "--config=configs/demo.py", "--mode=import",
       f"--workdir={tmp_path / 'w'}", f"--config.weights.uvit={path}"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "import uvit" in errors[0] and "pos_embed has 96 rows" in errors[0]
  assert not os.path.exists(tmp_path / "w" / "weights" / "uvit")


def test_files_this_uvit_cannot_hold_are_refused():
  tensors = dict(_released(8, 12, "v1", 64))
  config = _config(**_file_model(8, 12, "v1", 64))
  with pytest.raises(weight_jobs.WeightJobError, match=r"qkv biases \(mid_block\.attn\.qkv\.bias"):
    weight_jobs.plan_uvit_import(config, {**tensors, "mid_block.attn.qkv.bias": np.zeros(192)},
                                 "f.pth")
  with pytest.raises(weight_jobs.WeightJobError, match=r"no tensor 'pos_embed'"):
    weight_jobs.plan_uvit_import(config, {k: v for k, v in tensors.items() if k != "pos_embed"},
                                 "f.pth")
  config.model.update(width=96, num_heads=3)  # 3 heads do not divide the file's width 64
  with pytest.raises(weight_jobs.WeightJobError, match=r"64-wide heads: 1 for width 64"):
    weight_jobs.plan_uvit_import(config, tensors, "f.pth")


def _parse(argv: list[str]):
  """vocab.derive(demo.get_config("tiny")) with command-line overrides, through the parser main.py uses."""
  fv = flags.FlagValues()
  argv = ["prog", *argv]
  config_flags.DEFINE_config_dict("config", vocab.derive(demo.get_config("tiny")), flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config


def _printed_flags(out: str) -> list[str]:
  """The flags after 'use them with' in the import summary."""
  block = out.split("use them with", 1)[1].split("the U-ViT's flags are also in", 1)[0]
  return [a for a in block.split() if a.startswith("--config.")]


@pytest.mark.parametrize("latent,text,version,width", [(16, 77, "v0", 64), (8, 12, "v1", 128)])
def test_printed_flags_sample_and_export_to_strict_diffusers(latent, text, version, width,
                                                             tmp_path, capsys):
  """Import into the demo runbook (tiny), take the flags the import prints, sample 2 steps with
  them, export, and load the export into diffusers' UniDiffuserModel with strict=True."""
  # Encoder-facing sizes of configs/demo.py:tiny: text latent 8, CLIP image 32, 12 latent channels.
  enc = dict(text_dim=8, clip_img_dim=32, latent_channels=12)
  tensors = _released(latent, text, version, width, **enc)
  path = released.torch_save(tensors, tmp_path / f"uvit_{version}.pth")
  workdir = str(tmp_path / "w")
  if text == 12:  # demo.py:tiny has 6 text tokens, and 12 + (8/2)^2 rows leave 22: refused
    with pytest.raises(weight_jobs.WeightJobError, match="num_text_tokens"):
      weight_jobs.run_import(_parse([f"--config.weights.uvit={path}"]), workdir)
  known = [f"--config.model.num_text_tokens={text}"] if text == 12 else []
  done = weight_jobs.run_import(_parse([f"--config.weights.uvit={path}", *known]), workdir)
  printed = _printed_flags(capsys.readouterr().out)
  dest = done["uvit"]["path"]
  assert printed[-1] == f"--config.sample.checkpoint={dest}"
  with open(done["uvit"]["flagfile"]) as f:
    assert f.read().split() == printed
  want = _file_model(latent, text, version, width, **enc)
  assert done["uvit"]["model"] == want
  if latent != 8:  # tiny derives latent_size from data.resolution: both are set
    assert "--config.data.resolution=32" in printed

  # Without the flags: sample and fine-tuning stop before building anything, naming the fields.
  for run, flag in ((sample.run, "sample.checkpoint"), (train.train, "train.init_from")):
    bad = _parse([f"--config.{flag}={dest}"])
    bad.sample.tasks = ("t",)  # needs no prompts or images
    with pytest.raises(weight_jobs.WeightJobError) as e:
      run(bad, str(tmp_path / "bad"))
    assert "\n" not in str(e.value) and "--config.model.width=" in str(e.value)

  # The released weights predict the noise; demo.py:tiny says velocity: the import prints the
  # flag, and without it sampling stops before building anything.
  assert "--config.model.prediction=eps" in printed
  no_pred = _parse([a for a in printed if not a.startswith("--config.model.prediction")])
  no_pred.sample.tasks = ("t",)
  with pytest.raises(weight_jobs.WeightJobError, match="--config.model.prediction=eps"):
    sample.run(no_pred, str(tmp_path / "bad_prediction"))

  # With them, as printed: sample (t2i, 2 solver steps) ...
  config = _parse(printed)
  config.data.tokenizer = demo_data.build_tokenizer(str(tmp_path / "tokenizer"))
  vocab.derive(config)
  if text == 77:  # tiny's caption decoder has 16 positions: the import said so (a note)
    assert "captioner.n_positions 16 is too short" in " ".join(done["uvit"]["notes"])
    config.encoders.captioner.n_positions = 96
  config.mesh.num_devices = 1  # sharding is not what this test is about: faster compiles
  config.sample.update(tasks=("t2i",), steps=2, order=2, num=2, batch_size=2,
                       prompts=("a red circle on the left", "a blue square at the top"))
  sample.run(config, workdir)
  im = np.asarray(Image.open(os.path.join(workdir, "samples", "t2i", "00001.png")))
  assert im.shape == (2 * latent, 2 * latent, 3)  # the pixel autoencoder's factor 2

  # ... and export: the released tensors come back, and diffusers loads them strictly.
  out = weight_jobs.run_export(config, str(tmp_path / "x"))
  exported = load_tensors(out["uvit"]["path"])
  assert set(exported) == set(tensors)
  for k in tensors:
    np.testing.assert_array_equal(exported[k], tensors[k], err_msg=k)
  fresh = uvit_ref.torch_model(version, seed=9, cfg=want)
  fresh.load_state_dict(uvit_ref.released_to_diffusers(exported, version, depth=want["depth"]),
                        strict=True)

  # Our export records num_heads, which released files do not: a re-import takes it from there.
  plan = weight_jobs.plan_uvit_import(_config(**{**want, "num_heads": 2}), exported,
                                      out["uvit"]["path"], load_metadata(out["uvit"]["path"]))
  assert plan["model"] == want and not any("num_heads" in n for n in plan["notes"])

# Compared against an independent reference (PyTorch / numpy re-derivation): `-m "not parity"` skips.
pytestmark = pytest.mark.parity
