"""LoRA (unidiffuser_jax/lora.py): zero-init identity, merged == unmerged, only adapters trained,
sharded == single device, bitwise resume, adapter files, wrong-base refusal."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from data_pipelines import synthetic
from unidiffuser_jax import checkpoints, encoders as encoders_lib, errors, lora, sharding
from unidiffuser_jax import compile as compile_plan, train, vocab, weight_jobs
from unidiffuser_jax.models import uvit


def _model(**kw):
  c = demo.get_config("tiny")
  c.model.update(kw)
  return uvit.from_config(c.model)


def _inputs(model, b=2, seed=0):
  r = np.random.default_rng(seed)
  z, clip, text, _, _, dt = uvit.dummy_inputs(model, b)
  return (r.normal(size=z.shape).astype(np.float32), r.normal(size=clip.shape).astype(np.float32),
          r.normal(size=text.shape).astype(np.float32), np.array([10.0, 700.0], np.float32),
          np.array([500.0, 0.0], np.float32), dt)


def _params(model, seed=0):
  return nn.unbox(model.init(jax.random.key(seed), *uvit.dummy_inputs(model))["params"])


def _adapters(model, rank=4, targets=None, b_std=0.0, seed=1):
  found = lora.targets(uvit.abstract_variables(model)["params"],
                       targets or demo.get_config("tiny").train.lora.targets)
  ad = nn.unbox(lora.init_adapters(found, rank, jax.random.key(seed)))
  if b_std:
    ad = jax.tree_util.tree_map_with_path(
        lambda p, x: (b_std * jax.random.normal(jax.random.key(abs(hash(lora._name(p))) % 997),
                                                x.shape) if lora._name(p).endswith(lora.B) else x),
        ad)
  return ad


def _forward(model, params, x, adapters=None, scale=2.0):
  if adapters is None:
    return model.apply({"params": params}, *x)
  with lora.applied(adapters, scale):
    return model.apply({"params": params}, *x)


def test_default_targets_are_every_blocks_attention_and_mlp():
  model = _model()
  found = lora.targets(uvit.abstract_variables(model)["params"],
                       demo.get_config("tiny").train.lora.targets)
  blocks = ["in_blocks_0", "mid_block", "out_blocks_0"]
  assert sorted(found) == sorted(f"{b}/{m}" for b in blocks
                                 for m in ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2"))
  w = model.width
  assert found["in_blocks_0/attn/qkv"] == ((w, 3 * w), ("embed", "heads"))
  assert found["mid_block/mlp/fc2"] == ((model.mlp_dim, w), ("mlp", "embed"))
  with pytest.raises(errors.ConfigError, match="matches no Dense"):
    lora.targets(uvit.abstract_variables(model)["params"], "nothing/here")


@pytest.mark.parametrize("remat", ["none", "block"])
def test_zero_initialised_adapters_give_the_base_output(remat):
  model = _model(remat=remat)
  params, x = _params(model), _inputs(model)
  ad = _adapters(model)
  assert all(np.all(ab[lora.B] == 0) and np.any(ab[lora.A] != 0)
             for ab in lora.flatten(ad).values())
  for base, adapted in zip(_forward(model, params, x), _forward(model, params, x, ad)):
    np.testing.assert_array_equal(np.asarray(base), np.asarray(adapted))


@pytest.mark.parametrize("remat", ["none", "block"])
def test_merged_equals_unmerged_and_differs_from_base(remat):
  model = _model(remat=remat)
  params, x = _params(model), _inputs(model)
  ad = _adapters(model, b_std=0.3)
  unmerged = _forward(model, params, x, ad, scale=2.0)
  merged = _forward(model, lora.merge(params, ad, 2.0), x)
  base = _forward(model, params, x)
  for u, m, b in zip(unmerged, merged, base):
    np.testing.assert_allclose(np.asarray(u), np.asarray(m), atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(u) - np.asarray(b)).max() > 1e-2   # the adapters do something


def test_dropout_masks_the_adapter_input_only():
  model = _model()
  params, x = _params(model), _inputs(model)
  ad = _adapters(model, b_std=0.3)
  def run(key):
    with lora.applied(ad, 2.0, dropout=0.5, dropout_key=key):
      return np.asarray(model.apply({"params": params}, *x)[0])
  a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-3
  # A zero B: dropout or not, the output is the base's.
  zero = _adapters(model)
  with lora.applied(zero, 2.0, dropout=0.5, dropout_key=jax.random.key(0)):
    out = model.apply({"params": params}, *x)[0]
  np.testing.assert_array_equal(np.asarray(out), np.asarray(_forward(model, params, x)[0]))


# ---------------------------------------------------------------- the fine-tune

def _config(base_dir, **lora_kw):
  c = demo.get_config("tiny")
  c.train.init_from = str(base_dir)
  c.train.lora.update(dict(rank=4, **lora_kw))
  c.train.update(lr=1e-2, warmup_steps=0)
  return vocab.derive(c)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  """A tiny U-ViT's (random) params saved as --mode=import writes them."""
  model = _model()
  path = tmp_path_factory.mktemp("base") / "uvit"
  weight_jobs.save_params(str(path), _params(model, seed=3))
  return path


def _iterator():
  return synthetic.make_iterator(resolution=16, clip_resolution=16, max_length=6, vocab_size=60,
                                 host_batch=8, seed=5)


def _lora_task(config, mesh, workdir):
  """(model, full task, LoRA task, frozen inputs, their shardings) as train.train builds them."""
  model = uvit.from_config(config.model)
  enc = encoders_lib.build(config.encoders)
  enc_params, enc_sh = train.build_frozen(config, mesh, enc)
  task = train.uvit_task(model, enc, int(config.seed))
  return (model, task, *lora.finetune(task, model, config, mesh, enc_params, enc_sh,
                                      workdir=str(workdir)))


def _step(config, devices, workdir):
  """One LoRA train step on `devices` -> (state before, state after, metrics, frozen base)."""
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  _, _, task, frozen, frozen_sh = _lora_task(config, mesh, workdir)
  built = train.build_task(config, config.train, task, mesh, frozen, frozen_sh)
  state, state_sh = built.state, built.state_shardings
  before = jax.device_get(state)
  batch = sharding.to_global(next(_iterator()), mesh)
  after, m = built.step(state, frozen, batch)
  return before, jax.device_get(after), jax.device_get(m), frozen, state_sh


def test_the_one_build_makes_the_lora_step_abstract_or_real(base_dir, tmp_path):
  """train.build (describe, --mode=compile, train) builds the LoRA fine-tune: the state holds
  adapters alone, the base is a frozen input of train.lora.base_dtype; abstract needs no weights
  and has the real build's shapes, dtypes and shardings."""
  config = _config(base_dir, base_dtype="bfloat16")
  mesh = sharding.make_mesh(config.mesh)
  real = train.build(config, mesh, workdir=str(tmp_path))
  no_weights = config.copy_and_resolve_references()
  no_weights.train.init_from = ""
  abstract = train.build(no_weights, mesh, abstract=True)
  names = {"/".join(str(k.key) for k in p)[-6:]
           for p, _ in jax.tree_util.tree_flatten_with_path(abstract.state.params)[0]}
  assert names == {lora.A, lora.B}
  base = jax.tree.leaves(abstract.frozen["base"])
  assert base and all(x.dtype == jnp.bfloat16 for x in base)
  shape = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), t)
  assert shape(abstract.state) == shape(real.state)
  assert shape(abstract.frozen) == shape(real.frozen)
  assert (tmp_path / lora.BASE_RECORD).exists()


def test_only_adapters_are_trained(base_dir, tmp_path):
  config = _config(base_dir, dropout=0.1)
  before, after, m, frozen, _ = _step(config, jax.devices()[:1], tmp_path)
  names = {lora._name(p) for p, _ in jax.tree_util.tree_flatten_with_path(after.params)[0]}
  assert names and all(n.endswith(("/lora_a", "/lora_b")) for n in names)
  n_adapter = sum(x.size for x in jax.tree.leaves(after.params))
  # AdamW's two moments: exactly twice the adapters, nothing for the base.
  n_opt = sum(x.size for x in jax.tree.leaves(after.opt_state) if np.ndim(x) > 0)
  assert n_opt == 2 * n_adapter
  assert n_adapter < 0.2 * sum(x.size for x in jax.tree.leaves(frozen["base"]))
  # Step 0 moves B; A's gradient is zero while B is zero, so only AdamW's decay touches A.
  # The base is an untouched input.
  decay = 1.0 - config.train.lr * config.train.weight_decay
  for m_, ab in lora.flatten(after.params).items():
    assert np.abs(ab[lora.B]).max() > 0, m_
    np.testing.assert_allclose(ab[lora.A], decay * lora.flatten(before.params)[m_][lora.A],
                               rtol=1e-6)
  loaded = checkpoints.load_params(str(base_dir))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen["base"]), loaded)
  assert np.isfinite(m["loss"]) and m["grad_norm"] > 0


def test_base_kept_in_bfloat16(base_dir, tmp_path):
  config = _config(base_dir, base_dtype="bfloat16")
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  base, _, _ = lora.load_base(uvit.from_config(config.model), config.train.init_from, mesh, (),
                              "bfloat16")
  assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.slow
def test_lora_step_sharded_equals_single_device(base_dir, tmp_path):
  config = _config(base_dir)
  single = _step(config, jax.devices()[:1], tmp_path / "one")
  config.mesh = dict(data=2, fsdp=2, tensor=2, num_devices=0)
  multi = _step(config, jax.devices(), tmp_path / "eight")
  assert single[2]["loss"] == pytest.approx(multi[2]["loss"], rel=1e-5)
  assert single[2]["grad_norm"] == pytest.approx(multi[2]["grad_norm"], rel=1e-5)
  # Adam's first step is ~lr * sign(g): a gradient near zero amplifies float-order noise,
  # so the tolerance is a thousandth of the step (lr 1e-2).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               single[1].params, multi[1].params)
  # The adapters follow their kernel's logical names: qkv's A splits 'embed' over fsdp,
  # its B splits 'heads' over tensor.
  sh = multi[4].params["in_blocks_0"]["attn"]["qkv"]
  assert sh[lora.A].spec == jax.sharding.PartitionSpec("fsdp")
  assert sh[lora.B].spec == jax.sharding.PartitionSpec(None, "tensor")


@pytest.mark.slow
def test_lora_resume_is_bitwise(base_dir, tmp_path):
  def run(workdir, steps):
    config = _config(base_dir, dropout=0.1)
    config.train.steps = steps
    return train.train(config, str(workdir), data_iterator=_iterator())

  straight = run(tmp_path / "a", 6)
  run(tmp_path / "b", 3)
  resumed = run(tmp_path / "b", 6)
  assert straight["loss"] == resumed["loss"]
  pa = checkpoints.load_params(str(tmp_path / "a"), key=None)
  pb = checkpoints.load_params(str(tmp_path / "b"), key=None)
  jax.tree.map(np.testing.assert_array_equal, pa, pb)
  # The checkpoint holds the adapters (params, EMA, optimizer state), not the base.
  assert set(lora.flatten(pa["params"])) == set(lora.flatten(pa["ema_params"]))
  assert all(set(ab) == {lora.A, lora.B} for ab in lora.flatten(pa["params"]).values())


def test_resume_on_another_base_or_lora_config_is_refused(base_dir, tmp_path):
  ident = lora.base_identity(checkpoints.load_params(str(base_dir)), str(base_dir))
  lcfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets="mid_block/mlp/fc1")
  lora.record_run(str(tmp_path), ident, lcfg)
  lora.record_run(str(tmp_path), ident, lcfg)   # the same base and config: fine
  assert lora.read_run(str(tmp_path / "checkpoints" / "3")) == (ident, lcfg)
  other = lora.base_identity(_params(_model(), seed=9), "other")
  with pytest.raises(errors.ConfigError, match="trained on the base"):
    lora.record_run(str(tmp_path), other, lcfg)
  with pytest.raises(errors.ConfigError, match="resume it with its own values"):
    lora.record_run(str(tmp_path), ident, lora.LoraConfig(8, 8.0, 0.0, "mid_block/mlp/fc1"))


def test_lora_needs_init_from():
  c = demo.get_config("tiny")
  c.train.lora.rank = 2
  with pytest.raises(errors.ConfigError, match="init_from"):
    lora.load_base(uvit.from_config(c.model), "", None, (), "float32")
  for key, bad in (("rank", -1), ("dropout", 1.0), ("base_dtype", "float16"), ("targets", "(")):
    c = demo.get_config("tiny")
    c.train.lora[key] = bad
    with pytest.raises(errors.ConfigError, match=f"lora.{key}"):
      lora.LoraConfig.from_config(c.train.lora)



# ---------------------------------------------------------------- files, export, sampling

def _lora_run(base_dir, workdir, lcfg, seed=4):
  """A LoRA run's workdir as train.train leaves it (record + one checkpoint), with adapters whose
  B is not zero; -> its EMA adapters."""
  import orbax.checkpoint as ocp
  model = _model()
  ad = jax.device_get(_adapters(model, lcfg.rank, lcfg.targets, b_std=0.2, seed=seed))
  lora.record_run(str(workdir), lora.base_identity(checkpoints.load_params(str(base_dir)),
                                                   str(base_dir)), lcfg)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(workdir / "checkpoints" / "1" / "state",
               {"step": np.int32(1), "params": ad, "ema_params": ad})
  return ad


def _export_config(base_dir):
  c = _config(base_dir)
  c.model.prediction = "eps"   # the released layout holds noise-predicting U-ViTs
  return c


def test_export_writes_only_adapters_and_they_load_back(base_dir, tmp_path):
  lcfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1,
                         targets=demo.get_config("tiny").train.lora.targets)
  ad = _lora_run(base_dir, tmp_path / "run", lcfg)
  config = _export_config(base_dir)
  config.train.lora.rank = 0   # the run's record, not the flags, says what it is
  done = weight_jobs.run_export(config, str(tmp_path / "run"))
  path = done["lora"]["path"]
  assert set(done) == {"lora"} and path.endswith("uvit_v1.lora.safetensors")
  assert done["lora"]["params"] == sum(x.size for x in jax.tree.leaves(ad))
  back, lcfg_back, base = lora.load_adapters(path)
  assert lcfg_back == lcfg and base["name"] == str(base_dir)
  jax.tree.map(np.testing.assert_array_equal, back, ad)
  # Onto its own base: fine; onto another: refused, saying why.
  own = lora.base_identity(checkpoints.load_params(str(base_dir)), "base")
  lora.load_adapters(path, own)
  other = lora.base_identity(_params(_model(), seed=11), "another-base")
  with pytest.raises(errors.ConfigError, match="trained on the base.*another-base.*differ"):
    lora.load_adapters(path, other)


def test_export_merge_lora_writes_the_merged_released_layout(base_dir, tmp_path):
  from unidiffuser_jax.weights import uvit as wuvit
  from unidiffuser_jax.weights.tensors import load_tensors
  lcfg = lora.LoraConfig(rank=2, alpha=3.0, dropout=0.0, targets=r"mid_block/(attn/qkv|mlp/fc2)")
  ad = _lora_run(base_dir, tmp_path / "run", lcfg)
  config = _export_config(base_dir)
  config.export.merge_lora = True
  done = weight_jobs.run_export(config, str(tmp_path / "run"))
  model = uvit.from_config(config.model)
  got = wuvit.import_uvit(load_tensors(done["uvit"]["path"]), model)
  want = lora.merge(checkpoints.load_params(str(base_dir)), ad, 1.5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), got, want)
  base = checkpoints.load_params(str(base_dir))
  assert np.abs(got["mid_block"]["mlp"]["fc2"]["kernel"] - base["mid_block"]["mlp"]["fc2"]["kernel"]).max() > 1e-3
  np.testing.assert_array_equal(got["mid_block"]["mlp"]["fc1"]["kernel"],
                                base["mid_block"]["mlp"]["fc1"]["kernel"])


def _sampler_config(tiny_sampler, tmp_path, lcfg):
  config, model, params, _ = tiny_sampler
  ad = jax.device_get(_adapters(model, lcfg.rank, lcfg.targets, b_std=0.3, seed=7))
  base = lora.base_identity(checkpoints.load_params(config.sample.checkpoint), "base")
  path = str(tmp_path / "style.lora.safetensors")
  lora.save_adapters(path, ad, lcfg, base, config.model)
  return config, model, params, ad, path


@pytest.mark.slow   # three t2i compiles: ~45 s on a busy 2-core machine
def test_sampling_with_an_adapter_equals_sampling_the_merged_weights(tiny_sampler, tmp_path):
  from unidiffuser_jax import sample
  lcfg = lora.LoraConfig(rank=2, alpha=4.0, dropout=0.0,
                         targets=demo.get_config("tiny").train.lora.targets)
  config, model, params, ad, path = _sampler_config(tiny_sampler, tmp_path, lcfg)
  config = config.copy_and_resolve_references()
  config.sample.update(lora=path, lora_scale="0.5", batch_size=8)
  sampler = sample.load_sampler(config, str(tmp_path))
  merged = lora.merge(params, ad, lcfg.scale * 0.5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
               jax.device_get(sampler["params"]), merged)
  host, n = sample.task_inputs("t2i", sample.config_inputs(config), config)
  with_adapter = sample.generate("t2i", host, n, config, progress=False, **sampler)
  plain = sample.generate("t2i", host, n, config, progress=False,
                          **dict(sampler, params=jax.device_put(merged)))
  base = sample.generate("t2i", host, n, config, progress=False,
                         **dict(sampler, params=jax.device_put(params)))
  for a, b, c in zip(with_adapter, plain, base):
    np.testing.assert_array_equal(a["pixels"], b["pixels"])
    assert np.any(a["pixels"] != c["pixels"])


def test_sampling_refuses_an_adapter_of_another_base(tiny_sampler, tmp_path):
  from unidiffuser_jax import sample
  config, model, params, _ = tiny_sampler
  lcfg = lora.LoraConfig(rank=2, alpha=4.0, dropout=0.0, targets="mid_block/mlp/fc1")
  ad = jax.device_get(_adapters(model, 2, lcfg.targets))
  path = str(tmp_path / "other.lora.safetensors")
  lora.save_adapters(path, ad, lcfg, lora.base_identity(_params(model, seed=12), "other"),
                     config.model)
  config = config.copy_and_resolve_references()
  config.sample.update(lora=f"{path}", lora_scale="1.0")
  with pytest.raises(errors.ConfigError, match="trained on the base 'other'"):
    sample.load_sampler(config, str(tmp_path))
  with pytest.raises(errors.ConfigError, match="3 values for 2 LoRA files"):
    lora.parse_scales([path, path], "1,2,3")


def test_describe_reports_lora_against_full_fine_tuning():
  from unidiffuser_jax import describe
  c = demo.get_config("tiny")
  c.train.lora.update(rank=4, base_dtype="bfloat16")
  out = describe.describe(c, num_devices=1)
  model = uvit.from_config(c.model)
  found = lora.targets(uvit.abstract_variables(model)["params"], c.train.lora.targets)
  n_ad = sum(4 * (i + o) for (i, o), _ in found.values())
  n_base = uvit.count_params(dict(c.model, dtype=jnp.float32))
  assert f"{len(found)} layers, {n_ad} adapter params" in out
  mib = lambda n: f"{n / 2**20:.2f} MiB"
  # bf16 base; adapters, EMA float32; AdamW: two moments (+ a step count) per adapter.
  assert f"base (bfloat16, frozen) {mib(2 * n_base)}, adapters {mib(4 * n_ad)}, ema {mib(4 * n_ad)}" in out
  assert f"full fine-tuning: {mib(16 * n_base)}" in out


def test_a_fine_tune_keeps_its_bases_latent_normalisation(tmp_path):
  import json
  from unidiffuser_jax import latent_stats
  c = demo.get_config("tiny")
  c.encoders.fit_latent_stats = 16
  c.train.init_from = str(tmp_path / "base")
  stats = {"latent_shift": [0.1], "latent_scale": 2.5, "text_shift": [0.0], "text_scale": 0.5,
           "examples": 16}
  os.makedirs(tmp_path / "base")
  with open(latent_stats.path_in(str(tmp_path / "base")), "w") as f:
    json.dump(stats, f)
  never = lambda: pytest.fail("a fine-tune of a run with latent stats must not refit them")
  enc = encoders_lib.build(c.encoders)
  latent_stats.fit_or_load(c, enc, None, never, None, str(tmp_path / "run"))
  assert latent_stats.load(str(tmp_path / "run")) == latent_stats.load(str(tmp_path / "base"))


def test_the_three_forms_agree(base_dir, tmp_path):
  """The training loss (kernels merged inside each layer) against the loss of the globally merged
  params: same loss and adapter gradients; and the dropout form (output + dropout(x) A B) at a
  dropout so small that no unit is dropped gives the same output."""
  config = _config(base_dir)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  model, task, lora_task, frozen, _ = _lora_task(config, mesh, tmp_path)
  scale = lora.LoraConfig.from_config(config.train.lora).scale
  ad = _adapters(model, 4, b_std=0.2)
  batch = sharding.to_global(next(_iterator()), mesh)
  key = jax.random.key(0)

  def globally_merged(adapters):
    return task.loss(lora.merge(frozen["base"], adapters, scale), frozen["encoders"], batch, key)[0]

  (l1, _), g1 = jax.value_and_grad(lora_task.loss, has_aux=True)(ad, frozen, batch, key)
  l2, g2 = jax.value_and_grad(globally_merged)(ad)
  assert float(l1) == pytest.approx(float(l2), rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)
  assert max(float(np.abs(x).max()) for x in jax.tree.leaves(g1)) > 1e-4

  params, x = frozen["base"], _inputs(model)
  with lora.applied(ad, scale, dropout=1e-9, dropout_key=jax.random.key(0)):
    additive = model.apply({"params": params}, *x)
  for a, m in zip(additive, _forward(model, params, x, ad, scale)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(m), atol=1e-5, rtol=1e-5)


def test_compile_plans_the_lora_step_against_the_full_one(tmp_path):
  """--mode=compile builds through train.build, so with train.lora.rank it plans the LoRA step
  (no weights needed): XLA's argument bytes per device drop by exactly the state that LoRA
  does not hold (full: params, EMA, AdamW moments of every weight; LoRA: a frozen base and the
  adapters' state), and that is most of the full fine-tune's state."""
  per_device = lambda tree: sum(
      int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree))
  args, state = {}, {}
  for name, rank in (("full", 0), ("lora", 4)):
    c = vocab.derive(demo.get_config("tiny"))
    c.mesh = dict(data=2, fsdp=4, tensor=1, num_devices=0)
    c.compile.update(isolate=False)
    c.train.lora.rank = rank
    (row,) = [r for r in compile_plan.run(c, str(tmp_path / name)) if r["candidate"] == "train"]
    assert row["status"] == "ok", row
    args[name] = row["memory"]["arguments"]
    built = train.build(c, sharding.make_mesh(c.mesh), abstract=True)
    state[name] = per_device((built.state, built.frozen))
  assert args["full"] - args["lora"] == state["full"] - state["lora"], (args, state)
  assert state["lora"] < state["full"]
