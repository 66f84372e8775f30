"""--mode=import / --mode=export on tiny models saved in the released layouts.

Sources are written by the PyTorch references (diffusers' UniDiffuserModel renamed to the thu-ml
U-ViT layout, diffusers' AutoencoderKL renamed to the LDM layout, transformers' CLIP towers via
save_pretrained, diffusers' UniDiffuserTextDecoder renamed to caption_decoder.pth's layout, a hub
GPT-2 via save_pretrained); what the job writes is read back through the project's loaders and
compared with those source tensors, and what export writes is loaded back into PyTorch.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from diffusers.pipelines.deprecated.unidiffuser import modeling_text_decoder

from tests.refs import captioner as cap_ref
from tests.refs import clip as clip_ref
from tests.refs import released
from tests.refs.released import CAP
from tests.refs import uvit as uvit_ref
from tests.refs import vae as vae_ref
from unidiffuser_jax import checkpoints, encoders as encoders_lib, sample, sharding, weight_jobs
from unidiffuser_jax.models import uvit
from unidiffuser_jax.models.uvit import UViT
from unidiffuser_jax.weights import captioner as wcap
from unidiffuser_jax.weights import clip as wclip
from unidiffuser_jax.weights import uvit as wuvit
from unidiffuser_jax.weights import vae as wvae
from unidiffuser_jax.weights.convert import flatten
from unidiffuser_jax.weights.tensors import load_tensors
from unidiffuser_jax.weights.uvit import export_uvit

torch.set_num_threads(1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def _torch_caption_decoder(seed=0):
  torch.manual_seed(seed)
  ref = modeling_text_decoder.UniDiffuserTextDecoder(
      prefix_length=12, prefix_inner_dim=CAP["prefix_inner_dim"],
      prefix_hidden_dim=CAP["prefix_hidden_dim"], vocab_size=CAP["vocab_size"],
      n_positions=CAP["n_positions"], n_embd=CAP["n_embd"], n_layer=CAP["n_layer"],
      n_head=CAP["n_head"]).eval()
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in ref.named_parameters():
      p.copy_((1.0 if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") else 0.0)
              + 0.2 * torch.randn(p.shape, generator=g))
  return ref


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """Every part in its released layout, written by the PyTorch side."""
  d = tmp_path_factory.mktemp("sources")
  uvit_torch = uvit_ref.torch_model("v1")
  uvit = uvit_ref.diffusers_to_released(uvit_torch.state_dict(), "v1")
  vae = vae_ref.to_ldm(vae_ref.torch_vae().state_dict())
  text_ref, vision_ref = clip_ref.text_model(), clip_ref.vision_model()
  text_ref.save_pretrained(d / "clip_text")
  vision_ref.save_pretrained(d / "clip_image")
  cap_torch = _torch_caption_decoder()
  cap = cap_ref.released_layout(cap_ref.to_numpy(cap_torch.state_dict()))
  return dict(
      dir=d, uvit_torch=uvit_torch, uvit=uvit, vae=vae, cap_torch=cap_torch, cap=cap,
      clip_text_sd=cap_ref.to_numpy(text_ref.state_dict()),
      clip_image_sd=cap_ref.to_numpy(vision_ref.state_dict()),
      paths=dict(uvit=released.torch_save(uvit, d / "uvit_v1.pth"),
                 autoencoder=released.torch_save({**vae, "loss.logvar": np.zeros(())},
                                                 d / "autoencoder_kl.pth"),
                 clip_text=str(d / "clip_text"), clip_image=str(d / "clip_image"),
                 captioner=released.torch_save(cap, d / "caption_decoder.pth")))


@pytest.fixture(scope="module")
def imported(sources, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("import"))
  config = released.config(**sources["paths"])
  done = weight_jobs.run_import(config, workdir)
  return config, workdir, done


def _same_tensors(got: dict, want: dict):
  assert set(got) == set(want), (set(got) ^ set(want))
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


def test_import_writes_every_part_and_prints_overrides(imported, sources):
  config, workdir, done = imported
  assert set(done) == set(weight_jobs.PARTS)
  for part, d in done.items():
    assert d["path"] == os.path.join(os.path.abspath(workdir), "weights", part)
  assert done["uvit"]["overrides"] == [
      *(f"--config.model.{k}={uvit_ref.CFG[k] if k in uvit_ref.CFG else config.model[k]}"
        for k in wuvit.GEOMETRY),
      f"--config.sample.checkpoint={done['uvit']['path']}"]
  assert done["uvit"]["diffs"] == []
  assert done["clip_text"]["overrides"] == [
      f"--config.encoders.weights.clip_text={done['clip_text']['path']}"]
  assert done["uvit"]["params"] == sum(v.size for v in sources["uvit"].values())
  assert done["captioner"]["kind"] == "decoder"
  with open(os.path.join(workdir, "weights", "import.json")) as f:
    record = json.load(f)
  assert record["autoencoder"]["source"] == sources["paths"]["autoencoder"]
  assert record["uvit"]["model"] == dict(version="v1", num_data_types=2, **uvit_ref.CFG)


def test_written_dirs_load_through_project_loaders(imported, sources):
  config, workdir, done = imported
  # U-ViT: the path sample.py loads from config.sample.checkpoint.
  cfg = released.config()
  cfg.sample.checkpoint = done["uvit"]["path"]
  params = sample.load_uvit_params(cfg, workdir)
  _same_tensors(export_uvit(params, UViT(version="v1", **uvit_ref.CFG)), sources["uvit"])
  # The frozen encoders: config.encoders.weights.<part> as the printed overrides set it.
  enc_cfg = config.encoders
  for part in encoders_lib.PARTS:
    enc_cfg.weights[part] = done[part]["path"]
  enc = encoders_lib.build(enc_cfg)
  mesh = sharding.make_mesh(config.mesh)
  enc_params, _ = enc.load_params(enc_cfg.weights, mesh, 0, config.sharding.rules)
  host = jax.device_get(enc_params)
  _same_tensors(wvae.export_vae_tensors(host["autoencoder"], enc.autoencoder, "ldm"),
                sources["vae"])  # the LDM file's loss.* entry is training-only and dropped
  text = {k if k.startswith("text_model.") else "text_model." + k: v
          for k, v in sources["clip_text_sd"].items() if not k.endswith("position_ids")}
  _same_tensors(wclip.export_clip_text(host["clip_text"], enc.clip_text), text)
  vision = {k if k.startswith(("vision_model.", "visual_projection.")) else "vision_model." + k: v
            for k, v in sources["clip_image_sd"].items() if not k.endswith("position_ids")}
  _same_tensors(wclip.export_clip_vision(host["clip_image"], enc.clip_image), vision)
  _same_tensors(wcap.export_caption_decoder({"params": host["captioner"]}), sources["cap"])


def test_export_round_trip_and_pytorch_loads_it(imported, sources, tmp_path):
  config, workdir, done = imported
  cfg = released.config()
  cfg.sample.checkpoint = done["uvit"]["path"]
  cfg.encoders.weights.captioner = done["captioner"]["path"]
  out = weight_jobs.run_export(cfg, str(tmp_path))
  assert out["uvit"]["path"] == str(tmp_path / "export" / "uvit_v1.safetensors")
  exported = load_tensors(out["uvit"]["path"])
  _same_tensors(exported, sources["uvit"])
  cap_exported = load_tensors(out["captioner"]["path"])
  _same_tensors(cap_exported, sources["cap"])
  # A velocity-predicting U-ViT would be sampled wrongly by the released code: not exported.
  cfg_v = released.config()
  cfg_v.model.prediction = "v"
  cfg_v.sample.checkpoint = cfg.sample.checkpoint
  with pytest.raises(weight_jobs.WeightJobError, match="prediction='v'"):
    weight_jobs.run_export(cfg_v, str(tmp_path / "v"))

  # import -> export -> import: identical parameters.
  again = weight_jobs.run_import(released.config(uvit=out["uvit"]["path"],
                                         captioner=out["captioner"]["path"]),
                                 str(tmp_path / "again"))
  for part in ("uvit", "captioner"):
    a = flatten(checkpoints.load_params(done[part]["path"]))
    b = flatten(checkpoints.load_params(again[part]["path"]))
    _same_tensors({"/".join(k): v for k, v in b.items()}, {"/".join(k): v for k, v in a.items()})

  # diffusers' UniDiffuserModel loads the exported U-ViT and agrees with our model.
  fresh = uvit_ref.torch_model("v1", seed=9)
  missing, unexpected = fresh.load_state_dict(uvit_ref.released_to_diffusers(exported, "v1"),
                                              strict=True)
  assert not missing and not unexpected
  x = uvit_ref.inputs("v1")
  model = UViT(version="v1", **uvit_ref.CFG)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, **x))  # one compilation, not eager ops
  ours = [np.asarray(o) for o in apply(checkpoints.load_params(done["uvit"]["path"]),
                                       {k: jnp.asarray(v) for k, v in x.items()})]
  for name, w, g in zip(("z", "clip_img", "text"), uvit_ref.run_torch(fresh.eval(), x), ours):
    assert np.abs(w).max() > 0.1
    print(f"exported U-ViT in diffusers vs ours, {name}: max abs err {np.abs(g - w).max():.2e}")
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=name)

  # diffusers' UniDiffuserTextDecoder loads the exported caption decoder (module./gpt. names
  # are the released file's; diffusers drops "module." and calls the GPT-2 "transformer").
  renamed = {}
  for k, v in cap_exported.items():
    k = k[len("module."):]
    renamed["transformer." + k[len("gpt."):] if k.startswith("gpt.") else k] = torch.from_numpy(v)
  dec = _torch_caption_decoder(seed=5)
  missing, unexpected = dec.load_state_dict(renamed, strict=False)
  assert not missing and all(k.endswith(("attn.bias", "attn.masked_bias")) for k in unexpected)
  ids = torch.randint(0, CAP["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(0))
  prefix = torch.randn(2, 12, CAP["prefix_inner_dim"], generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    want = sources["cap_torch"](ids, prefix)[0].logits
    got = dec(ids, prefix)[0].logits
  torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_export_reads_ema_params_of_a_workdir(imported, tmp_path):
  import orbax.checkpoint as ocp
  config, _, done = imported
  ema = checkpoints.load_params(done["uvit"]["path"])
  raw = jax.tree.map(np.zeros_like, ema)
  step_dir = tmp_path / "run" / "checkpoints" / "7" / "state"
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(str(step_dir), {"step": np.int32(7), "params": raw, "ema_params": ema,
                            "opt_state": {"count": np.int32(7)}})
  ckpt.wait_until_finished()
  out = weight_jobs.run_export(released.config(), str(tmp_path / "run"))
  assert set(out) == {"uvit"}  # no caption decoder in this workdir: skipped, not an error
  exported = load_tensors(out["uvit"]["path"])
  np.testing.assert_array_equal(exported["pos_embed"], ema["pos_embed"])
  assert np.abs(exported["mid_block.mlp.fc1.weight"]).max() > 0  # EMA, not the zero raw params


def test_fresh_captioner_from_hub_gpt2(tmp_path, monkeypatch):
  cfg = transformers.GPT2Config(vocab_size=CAP["vocab_size"] - 1, n_positions=CAP["n_positions"],
                                n_embd=CAP["n_embd"], n_layer=CAP["n_layer"], n_head=CAP["n_head"])
  torch.manual_seed(0)
  hub = transformers.GPT2LMHeadModel(cfg).eval()
  snap = tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots" / "abc"  # as "gpt2"
  hub.save_pretrained(snap)
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  done = weight_jobs.run_import(released.config(captioner="gpt2"), str(tmp_path / "w"))
  assert done["captioner"]["kind"] == "gpt2"
  assert done["captioner"]["overrides"] == [
      f"--config.captioner.train.init_from={done['captioner']['path']}"]
  params = checkpoints.load_params(done["captioner"]["path"])
  wte = hub.transformer.wte.weight.detach().numpy()
  got = params["gpt"]["wte"]["embedding"]
  np.testing.assert_array_equal(got[:-1], wte)
  np.testing.assert_allclose(got[-1], wte.mean(0), atol=1e-6)  # the <|EOS|> row
  np.testing.assert_array_equal(params["gpt"]["h_1"]["mlp"]["c_fc"]["kernel"],
                                hub.transformer.h[1].mlp.c_fc.weight.detach().numpy())
  assert set(params) == {"prefix_encoder", "prefix_decoder", "gpt"}
  # The printed override is what the stage-1 trainer takes (train.start_from swaps these
  # values in); it needs the same tree and shapes as the trainer's own init.
  import flax.linen as nn
  from unidiffuser_jax import captioner_train
  cfg = released.config()
  cfg.captioner = dict(max_caption_tokens=8)
  task = captioner_train.captioner_task(encoders_lib.build(cfg.encoders), cfg, None)
  shapes = nn.unbox(jax.eval_shape(task.init_params))
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(params)
  assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(np.shape, params)
  # A hub GPT-2 of another size is refused with the config keys to change.
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "none"))
  big = released.config(captioner=str(snap))
  big.encoders.captioner.n_layer = 3
  with pytest.raises(weight_jobs.WeightJobError, match=r"n_layer: file 2, config 3"):
    weight_jobs.run_import(big, str(tmp_path / "w2"))


def test_uvit_config_mismatch_is_named_and_the_file_decides(sources, tmp_path, capsys):
  """A v1 file imported with a v0 config of another width and latent size: the weights are
  written for the file's model; the summary names each difference and prints its flags."""
  cfg = released.config(uvit=sources["paths"]["uvit"])
  cfg.model.update(version="v0", width=64, num_heads=8, mlp_dim=256, latent_size=16)
  done = weight_jobs.run_import(cfg, str(tmp_path))
  out = capsys.readouterr().out
  assert [k for k, _, _ in done["uvit"]["diffs"]] == ["version", "latent_size", "width", "mlp_dim"]
  assert "version (weights 'v1', config 'v0')" in out and "configs/laion.py:v1" in out
  assert "latent_size (weights 8, config 16)" in out and "resize_pos_embed=True" in out
  for flag in ("version=v1", "latent_size=8", "width=32", "mlp_dim=128"):
    assert f"--config.model.{flag}" in out
  assert "--config.data.resolution" not in out  # this config does not derive latent_size
  # num_heads 8 divides width 32 and is kept (not in the file): said so.
  assert done["uvit"]["model"]["num_heads"] == 8 and "num_heads 8 is not stored" in out
  params = checkpoints.load_params(done["uvit"]["path"])
  assert params["pos_embed"].shape == sources["uvit"]["pos_embed"].shape


def test_full_size_released_layout_fits_configs_laion():
  """The released uvit_v1.pth shapes (REFERENCE.md facts: width 1536, depth 30, MLP 6144, pos_embed
  1104 tokens, 952,509,520 parameters) fit configs/laion.py; its v0 variant differs only in the
  version (pointed to configs/laion.py:v1). Shapes only: nothing of full size is allocated."""
  import flax.linen as nn
  from configs import laion
  from unidiffuser_jax.models.uvit import abstract_variables
  from unidiffuser_jax.weights import convert
  from unidiffuser_jax.weights.uvit import uvit_entries
  config = laion.get_config()
  model = uvit.from_config(config.model)
  template = flatten(nn.meta.unbox(abstract_variables(model))["params"])
  shapes = {}
  for e in uvit_entries(model):
    s = tuple(template[e.path].shape)
    s = s[::-1] if e.to_theirs is convert.linear_kernel else (
        (s[3], s[2], s[0], s[1]) if len(s) == 4 else s)
    shapes[e.name] = jax.ShapeDtypeStruct(s, jnp.float32)
  assert shapes["pos_embed"].shape == (1, 1104, 1536)
  assert sum(int(np.prod(x.shape)) for x in shapes.values()) == 952_509_520
  plan = weight_jobs.plan_uvit_import(config, shapes, "uvit_v1.pth")
  assert plan["model"] == dict(version="v1", num_data_types=2, width=1536, latent_channels=4,
                               patch_size=2, depth=30, num_heads=24, mlp_dim=6144, text_dim=64,
                               clip_img_dim=512, num_text_tokens=77, latent_size=64)
  assert plan["diffs"] == [] and len(plan["notes"]) == 1 and "num_heads 24" in plan["notes"][0]
  v0 = laion.get_config("v0")
  plan = weight_jobs.plan_uvit_import(v0, shapes, "uvit_v1.pth")
  assert plan["diffs"] == [("version", "v1", "v0")]
  assert any("configs/laion.py:v1" in n for n in plan["notes"])


def test_uvit_for_another_latent_size_is_interpolated_on_request(sources, tmp_path):
  cfg = released.config(uvit=sources["paths"]["uvit"])
  cfg.model.latent_size = 12  # the file's is 8: a 4x4 patch grid becomes 6x6
  plain = weight_jobs.run_import(cfg, str(tmp_path / "plain"))
  assert plain["uvit"]["diffs"] == [("latent_size", 8, 12)]
  assert "--config.weights.resize_pos_embed=True" in " ".join(plain["uvit"]["notes"])
  cfg.weights.resize_pos_embed = True
  done = weight_jobs.run_import(cfg, str(tmp_path))
  assert done["uvit"]["diffs"] == [] and done["uvit"]["model"]["latent_size"] == 12
  got = checkpoints.load_params(done["uvit"]["path"])
  src, w = sources["uvit"]["pos_embed"], uvit_ref.CFG["width"]
  n_prefix = 3 + uvit_ref.CFG["num_text_tokens"]  # times, text, clip_img
  grid = torch.from_numpy(src[:, n_prefix:]).reshape(1, 4, 4, w).permute(0, 3, 1, 2)
  want = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bilinear")
  want = want.permute(0, 2, 3, 1).reshape(1, 36, w).numpy()
  assert got["pos_embed"].shape == (1, n_prefix + 36, w)
  np.testing.assert_allclose(got["pos_embed"][:, n_prefix:], want, atol=1e-6)
  np.testing.assert_array_equal(got["pos_embed"][:, :n_prefix], src[:, :n_prefix])
  np.testing.assert_array_equal(got["pos_embed_token"], sources["uvit"]["pos_embed_token"])
  np.testing.assert_array_equal(got["mid_block"]["mlp"]["fc1"]["kernel"],
                                sources["uvit"]["mid_block.mlp.fc1.weight"].T)


def test_misshaped_and_missing_tensors_are_named(sources, tmp_path):
  bad = dict(sources["uvit"])
  bad["in_blocks.1.mlp.fc1.bias"] = bad["in_blocks.1.mlp.fc1.bias"][:-1]
  del bad["out_blocks.0.norm1.bias"]
  save_file(bad, str(tmp_path / "bad.safetensors"))
  with pytest.raises(weight_jobs.WeightJobError) as e:
    weight_jobs.run_import(released.config(uvit=str(tmp_path / "bad.safetensors")), str(tmp_path))
  assert "'in_blocks.1.mlp.fc1.bias' has shape (127,)" in str(e.value)
  assert "missing tensor 'out_blocks.0.norm1.bias'" in str(e.value)
  cap = dict(sources["cap"])
  cap["module.decode_prefix.weight"] = cap["module.decode_prefix.weight"][:, :-1]
  with pytest.raises(weight_jobs.WeightJobError, match=r"module\.decode_prefix\.weight"):
    weight_jobs.run_import(released.config(captioner=released.torch_save(cap, tmp_path / "c.pth")),
                           str(tmp_path))


class _Evil:
  """Pickles as a call to os.system; a plain unpickler would run it."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.multiprocess
def test_pickled_payload_is_refused_in_one_line(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "uvit_v1.pth"
  torch.save({"pos_embed": torch.zeros(1, 3, 4), "x": _Evil(marker)}, str(path))
  proc = subprocess.run(
      [sys.executable, "-m", "unidiffuser_jax.main", "--config=configs/demo.py", "--mode=import",
       f"--workdir={tmp_path / 'w'}", f"--config.weights.uvit={path}"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "import uvit" in errors[0] and "refusing to load global" in errors[0]
  assert "system" in errors[0]
  assert not marker.exists()
  assert not os.path.exists(tmp_path / "w" / "weights" / "uvit")

# Compared against an independent reference (PyTorch / numpy re-derivation): `-m "not parity"` skips.
pytestmark = pytest.mark.parity
