"""The sampling job: determinism per seed, independence from the batch split, outputs on disk."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from unidiffuser_jax import errors, rng, sample
from unidiffuser_jax.diffusion import modes


@pytest.fixture(scope="module")
def setup(tiny_sampler):
  return tiny_sampler


@pytest.mark.slow
def test_batch_split_and_seed(setup):
  """Samples depend on (seed, index) only: 4 at once == 2 + 2; another seed differs."""
  config, model, params, _ = setup
  shapes = modes.LatentShapes(z=(model.latent_size,) * 2 + (model.latent_channels,),
                              clip=(1, model.clip_img_dim),
                              text=(model.num_text_tokens, model.text_dim))
  # U-ViT and solver only (decoding is per-sample and deterministic): use the t2i latent.
  kw = dict(shapes=shapes, steps=3, order=2, method="multistep", skip_type="time_uniform",
            guidance_scale=3.0)

  @jax.jit
  def run(text, idx, seed):
    nnet = lambda *a: model.apply({"params": params}, *a)
    keys = jax.vmap(lambda i: rng.key_for(seed, i, "sample/t2i"))(idx)
    return jax.vmap(lambda t, k: modes.t2i(nnet, t[None], k, **kw)[0][0])(text, keys)

  text = jax.random.normal(jax.random.key(7), (4,) + shapes.text)
  all4 = run(text, jnp.arange(4), 1)
  split = jnp.concatenate([run(text[:2], jnp.arange(2), 1), run(text[2:], jnp.arange(2, 4), 1)])
  np.testing.assert_allclose(all4, split, rtol=1e-5, atol=1e-5)
  again = run(text, jnp.arange(4), 1)
  np.testing.assert_array_equal(all4, again)
  other = run(text, jnp.arange(4), 2)
  assert np.abs(np.asarray(other) - np.asarray(all4)).mean() > 1e-2


@pytest.mark.slow
def test_sample_job_writes_outputs(setup, tmp_path):
  config, _, _, _ = setup
  config = config.copy_and_resolve_references()
  config.sample.tasks = ("t2i", "t")
  config.sample.batch_size = 8
  config.sample.num = 3
  out = sample.run(config, str(tmp_path))
  for i in range(3):
    im = np.asarray(Image.open(tmp_path / "samples" / "t2i" / f"{i:05d}.png"))
    assert im.shape == (16, 16, 3) and im.dtype == np.uint8
  assert os.path.isfile(tmp_path / "samples" / "t2i" / "grid.png")
  lines = (tmp_path / "samples" / "t" / "captions.jsonl").read_text().splitlines()
  assert [json.loads(x)["index"] for x in lines] == [0, 1, 2]
  assert all(isinstance(json.loads(x)["caption"], str) for x in lines)
  assert out["t2i"]["num"] == 3 and out["t"]["num"] == 3


def test_missing_inputs_are_reported(setup, tmp_path):
  config, _, _, _ = setup
  config = config.copy_and_resolve_references()
  config.sample.tasks = ("i2t",)
  with pytest.raises(ValueError, match="needs input images"):
    sample.run(config, str(tmp_path))


def test_bad_solver_settings_fail_before_loading(setup, tmp_path):
  config, _, _, _ = setup
  config = config.copy_and_resolve_references()
  config.sample.method = "singlestep_fast"  # no longer a method name
  config.sample.checkpoint = str(tmp_path / "missing")  # never reached
  with pytest.raises(errors.ConfigError, match="config.sample: unknown method"):
    sample.run(config, str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("task", list(sample.TASKS))
def test_each_task_makes_what_it_declares(setup, task):
  """The table's inputs feed the program, and its outputs are what the program returns."""
  config, model, params, _ = setup
  s = config.sample
  shapes = modes.LatentShapes(z=(model.latent_size,) * 2 + (model.latent_channels,),
                              clip=(1, model.clip_img_dim),
                              text=(model.num_text_tokens, model.text_dim))
  from unidiffuser_jax import encoders as encoders_lib
  encoders = encoders_lib.build(config.encoders)
  spec = sample.TASKS[task]
  b, f32 = 2, jnp.float32
  inputs = {}
  if "prompts" in spec.inputs:
    inputs["text"] = jax.ShapeDtypeStruct((b,) + shapes.text, f32)
  for sfx in ([""] if "images" in spec.inputs else ["", "2"] if "image_pairs" in spec.inputs
              else []):
    inputs["z" + sfx] = jax.ShapeDtypeStruct((b,) + shapes.z, f32)
    inputs["clip" + sfx] = jax.ShapeDtypeStruct((b,) + shapes.clip, f32)
  enc_params = jax.eval_shape(lambda: {p: encoders._init_part(p, jax.random.key(0))
                                       for p in ("autoencoder", "captioner")})
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), b))
  out = jax.eval_shape(sample.mode_program(task, model, encoders, s, shapes), params,
                       nn.unbox(enc_params), inputs, keys)
  assert ("pixels" in out) == ("image" in spec.outputs), sorted(out)
  assert ("tokens" in out) == ("caption" in spec.outputs), sorted(out)
  assert all(v.shape[0] == b for v in jax.tree.leaves(out))


def test_task_inputs_name_their_files_and_state_the_cap(setup, capsys):
  config, _, _, _ = setup
  inputs = {"prompts": ["a", "b"], "images": ["x/p.png", "x/q.png", "x/r.png"]}
  host, n = sample.task_inputs("i2t", inputs, config)
  assert n == 3 and host["image_names"] == ["p.png", "q.png", "r.png"] and "prompts" not in host
  host, n = sample.task_inputs("interpolate", inputs, config)
  assert n == 1 and host["image_names"] == ["p.png"] and host["image2_names"] == ["q.png"]
  assert "r.png" in capsys.readouterr().out   # the left-out image is named, not dropped silently
  host, n = sample.task_inputs("joint", inputs, config)
  assert host == {} and n == config.sample.num
  host, _ = sample.task_inputs("i2t", {"images": [b"..."], "image_names": ["k.png"]}, config)
  assert host["image_names"] == ["k.png"]


def test_sample_imports_no_judge():
  """Scoring is the caller's: the sampler knows no demo set or judge."""
  import ast
  tree = ast.parse(open(sample.__file__).read())
  names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
  names += [f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
            for a in n.names]
  assert not [m for m in names if "demo" in m or "judge" in m], names


def test_task_guidance_overrides_the_default_per_task(setup):
  config, _, _, _ = setup
  s = config.copy_and_resolve_references().sample
  s.guidance_scale, s.task_guidance = 7.0, ("i2t=3", " gibbs = 0.5")
  assert sample.guidance_scale(s, "i2t") == 3.0
  assert sample.guidance_scale(s, "gibbs") == 0.5
  assert sample.guidance_scale(s, "t2i") == 7.0
  for bad in ("i2t", "x2y=3", "i2t=strong"):
    s.task_guidance = (bad,)
    with pytest.raises(errors.ConfigError, match="task_guidance entry"):
      sample.guidance_scale(s, "t2i")


@pytest.mark.slow
def test_task_guidance_reaches_the_sampler(setup, tmp_path):
  """t2i with task_guidance t2i=0 samples what guidance_scale=0 samples, not the default's."""
  config, _, _, _ = setup
  config = config.copy_and_resolve_references()
  sampler = sample.load_sampler(config, str(tmp_path))
  host, n = sample.task_inputs("t2i", sample.config_inputs(config), config)

  def pixels(**overrides):
    c = config.copy_and_resolve_references()
    c.sample.update(overrides)
    return np.stack([r["pixels"] for r in sample.generate("t2i", host, n, c, progress=False,
                                                          **sampler)])

  per_task = pixels(guidance_scale=20.0, task_guidance=("t2i=0",))
  np.testing.assert_array_equal(per_task, pixels(guidance_scale=0.0))
  # (a random U-ViT: guidance moves few pixels, but some)
  assert (per_task != pixels(guidance_scale=20.0)).any()
