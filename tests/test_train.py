"""The core training step and loop: sharding equivalence, overfitting, resume, timesteps."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from scipy import stats

from configs import demo
from data_pipelines import synthetic
from unidiffuser_jax import encoders as encoders_lib
from unidiffuser_jax import errors, sharding, train, vocab
from unidiffuser_jax.diffusion import objective
from unidiffuser_jax.models import uvit


def _tiny(**overrides):
  """configs/demo.py:tiny with config.train `overrides`; vocabulary from its synthetic tokens."""
  c = demo.get_config("tiny")
  c.train.update(overrides)
  return vocab.derive(c)


def _setup(config, devices):
  """The trainer's build (train.build) on `devices`, and the model and encoders it holds."""
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  enc = encoders_lib.build(config.encoders)
  built = train.build(config, mesh, encoders=enc)
  return built, uvit.from_config(config.model), enc


def _host_batch(config):
  it = synthetic.make_iterator(resolution=config.data.resolution,
                               clip_resolution=config.data.clip_resolution,
                               max_length=config.data.max_length, vocab_size=60,
                               host_batch=config.train.batch_size, seed=3)
  return next(it)


def _grads_and_loss(config, devices):
  built, model, enc = _setup(config, devices)
  mesh, enc_params, state = built.mesh, built.frozen, built.state
  batch = sharding.to_global(_host_batch(config), mesh)

  def loss(params):
    key = jax.random.key(0)
    z0, c0, t0 = enc.batch_to_latents(enc_params, batch, key)
    nnet = lambda *a: model.apply({"params": params}, *a)
    return objective.loss_fn(nnet, z0, c0, t0, batch["data_type"], jax.random.key(1))[0]

  l, g = jax.jit(jax.value_and_grad(loss))(state.params)
  new_state, m = built.step(state, enc_params, batch)
  return float(l), jax.device_get(g), jax.device_get(new_state.params), float(m["loss"]), new_state


# Four compiles of the train step on 1 and 8 devices: 92 CPU-s on one core, a third of the
# quick loop's budget; test_aot and the golden sharding tests cover layouts quickly.
@pytest.mark.slow
def test_sharded_step_matches_single_device():
  config = _tiny()
  single = _grads_and_loss(config, jax.devices()[:1])
  config.mesh = dict(data=2, fsdp=2, tensor=2, num_devices=0)
  multi = _grads_and_loss(config, jax.devices())
  assert single[0] == pytest.approx(multi[0], rel=1e-5)
  assert single[3] == pytest.approx(multi[3], rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), single[1], multi[1])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), single[2], multi[2])

  # Every parameter, EMA copy and AdamW moment is split over the mesh axes its logical names
  # (from the model's own init, not the build) map to.
  state = multi[4]
  mesh = sharding.make_mesh(config.mesh)
  model = uvit.from_config(config.model)
  logical = nn.get_partition_spec(jax.eval_shape(
      lambda: model.init(jax.random.key(0), *uvit.dummy_inputs(model))["params"]))
  rules = dict(sharding.rules_from_config(config.sharding.rules))
  n_split = 0
  copies = [state.params, state.ema_params] + [optax.tree_utils.tree_get(state.opt_state, k)
                                               for k in ("mu", "nu")]
  for arr, names in zip(jax.tree.leaves(copies), jax.tree.leaves(
      [logical] * 4, is_leaf=lambda x: isinstance(x, P))):
    expected = sharding.fit_spec(P(*[rules.get(n) if n else None for n in names]), arr.shape, mesh)
    assert arr.sharding.spec == expected, (arr.shape, names)
    shard_shape = arr.sharding.shard_shape(arr.shape)
    for dim, axes in enumerate(expected):
      if axes is not None:
        assert shard_shape[dim] == arr.shape[dim] // mesh.shape[axes]
        n_split += 1
  assert n_split > 20  # the test is about real splits, not replicated arrays


def test_timesteps_independent_and_cover_range():
  t_img, t_text = jax.device_get(objective.sample_timesteps(jax.random.key(0), 200_000))
  assert t_img.min() == 1 and t_img.max() == 1000 and t_text.min() == 1 and t_text.max() == 1000
  counts = np.bincount(t_img, minlength=1001)[1:]
  assert stats.chisquare(counts).pvalue > 1e-3           # uniform over 1..1000
  table = np.histogram2d(t_img, t_text, bins=10)[0]
  assert stats.chi2_contingency(table).pvalue > 1e-3     # independent
  assert abs(np.corrcoef(t_img, t_text)[0, 1]) < 0.01


@pytest.mark.slow
def test_overfits_fixed_batch():
  """One fixed batch with fixed timesteps and noise (the step counter is held at 0, so
  the derived key never changes): a tiny model must memorise it, loss down 100x in 100 steps
  (measured: 14x by step 50, 585x by step 100)."""
  config = _tiny(lr=3e-3, warmup_steps=0, grad_clip_norm=0.0)
  config.model.update(width=64, mlp_dim=256)   # enough capacity to memorise 8 examples
  built, _, _ = _setup(config, jax.devices())
  batch = sharding.to_global(_host_batch(config), built.mesh)
  state, losses = built.state, []
  for _ in range(100):
    state, m = built.step(state, built.frozen, batch)
    state = state.replace(step=jnp.zeros_like(state.step))
    losses.append(m)
  losses = jax.device_get(losses)
  first, last = losses[0], losses[-1]
  for k in ("loss_img", "loss_clip", "loss_text"):
    assert all(np.isfinite(m[k]) for m in losses)
  assert last["loss"] < first["loss"] / 100, (first["loss"], last["loss"])


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
  def run(workdir, steps):
    config = _tiny(steps=steps)
    it = synthetic.make_iterator(resolution=16, clip_resolution=16, max_length=6, vocab_size=60,
                                 host_batch=8, seed=5)
    return train.train(config, str(workdir), data_iterator=it)

  straight = run(tmp_path / "a", 6)
  run(tmp_path / "b", 3)
  resumed = run(tmp_path / "b", 6)
  assert straight["loss"] == resumed["loss"]
  from unidiffuser_jax import checkpoints
  pa = checkpoints.load_params(str(tmp_path / "a"), key=None)
  pb = checkpoints.load_params(str(tmp_path / "b"), key=None)
  jax.tree.map(np.testing.assert_array_equal, pa, pb)


@pytest.mark.slow
def test_grad_accumulation_averages_microbatch_gradients():
  """accum=2: the update uses the mean of the gradients of the two interleaved microbatches,
  each drawn with its own fold of the step key."""
  config = _tiny()
  config.train.grad_accum = 2
  built, model, enc = _setup(config, jax.devices())
  enc_params, tx = built.frozen, built.tx
  state = jax.tree.map(jnp.copy, built.state)   # the step donates its input
  host = _host_batch(config)
  new_state, m = built.step(built.state, enc_params, sharding.to_global(host, built.mesh))

  from unidiffuser_jax import rng
  key = rng.key_for(0, 0, "train/uvit")

  def micro_loss(params, batch, k):
    k_enc, k_loss = jax.random.split(k)
    z0, c0, t0 = enc.batch_to_latents(enc_params, batch, k_enc)
    nnet = lambda *a: model.apply({"params": params}, *a)
    return objective.loss_fn(nnet, z0, c0, t0, batch["data_type"], k_loss,
                             **objective.config_kwargs(config.train))[0]

  grads, losses = [], []
  micro_grad = jax.jit(jax.value_and_grad(micro_loss))   # one compile instead of op-by-op
  for i in range(2):
    micro = {k: jnp.asarray(v[i::2]) for k, v in host.items()}   # every 2nd example
    l, g = micro_grad(state.params, micro, jax.random.fold_in(key, i))
    grads.append(g)
    losses.append(float(l))
  mean_g = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  updates, _ = jax.jit(tx.update)(mean_g, state.opt_state, state.params)
  expected = jax.tree.map(lambda p, u: p + u, state.params, updates)
  assert float(m["loss"]) == pytest.approx(np.mean(losses), rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.device_get(new_state.params), jax.device_get(expected))


@pytest.mark.slow
def test_fine_tune_starts_from_given_weights(tmp_path):
  import orbax.checkpoint as ocp
  config = _tiny()
  built, _, _ = _setup(config, jax.devices())
  state, state_sh = built.state, built.state_shardings
  shifted = jax.tree.map(lambda x: np.asarray(x) + 1.0, jax.device_get(state.params))
  with ocp.StandardCheckpointer() as ckptr:   # leaving the block waits for the async save
    ckptr.save(tmp_path / "w", shifted)
  started = train.start_from(state, state_sh, str(tmp_path / "w"))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(started.params), shifted)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(started.ema_params), shifted)
  assert jax.tree.map(lambda a: a.sharding, started.params) == state_sh.params
  # A model of another width is refused, naming the first mismatching parameter.
  config.model.update(width=64, mlp_dim=128)
  other, _, _ = _setup(config, jax.devices())
  with pytest.raises(errors.ConfigError, match="has shape"):
    train.start_from(other.state, other.state_shardings, str(tmp_path / "w"))


def test_lr_schedule_warmup_then_constant_or_cosine():
  """Warm-up is linear from 0; 'constant' holds lr after it, 'cosine' falls to 0 at train.steps
  (half of lr half-way through the decay); an unknown name is one ConfigError."""
  cfg = demo.get_config("tiny").train
  cfg.update(steps=110, warmup_steps=10, lr=2e-3)
  const = train.lr_schedule(cfg)
  np.testing.assert_allclose([const(0), const(5), const(10), const(109)], [0, 1e-3, 2e-3, 2e-3],
                             rtol=1e-6)
  cfg.lr_decay = "cosine"
  cos = train.lr_schedule(cfg)
  np.testing.assert_allclose([cos(5), cos(10), cos(60), cos(110)], [1e-3, 2e-3, 1e-3, 0.0],
                             rtol=1e-5, atol=1e-9)
  assert all(float(cos(s)) >= float(cos(s + 1)) for s in range(10, 110))
  cfg.lr_decay = "linear"
  with pytest.raises(errors.ConfigError, match="lr_decay"):
    train.lr_schedule(cfg)
