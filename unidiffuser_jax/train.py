"""Training UniDiffuser's U-ViT, top to bottom: state, step, loop, periodic actions.

Read `train()` from top to bottom: build the mesh and the model, create (or
restore) the sharded state, then loop: next batch -> jitted step -> metrics ->
checkpoint. Everything random comes from rng.key_for(seed, step, purpose), and
the data iterator is checkpointed with the state, so stopping and re-running
the same command continues exactly as an unbroken run.
"""
from collections.abc import Callable
import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from unidiffuser_jax import checkpoints, encoders as encoders_lib, metrics, rng, sharding
from unidiffuser_jax.diffusion import objective
from unidiffuser_jax.models import uvit

log = logging.getLogger(__name__)


@struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: number of finished optimizer steps
  params: dict             # float32 master weights
  ema_params: dict         # exponential moving average of params (used for sampling)
  opt_state: optax.OptState


# ---------------------------------------------------------------- construction

def make_model(model_cfg) -> uvit.UViT:
  cfg = dict(model_cfg)
  cfg["dtype"] = jnp.dtype(cfg.get("dtype", "float32"))
  return uvit.UViT(**cfg)


def lr_schedule(train_cfg) -> optax.Schedule:
  """Linear warm-up from 0 to lr over warmup_steps, then constant (U-ViT's recipe)."""
  warm = max(0, int(train_cfg.warmup_steps))
  if warm == 0:
    return optax.constant_schedule(train_cfg.lr)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, train_cfg.lr, warm), optax.constant_schedule(train_cfg.lr)],
      [warm])


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  b1, b2 = train_cfg.betas
  parts = []
  if train_cfg.grad_clip_norm and train_cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(train_cfg.grad_clip_norm))
  parts.append(optax.adamw(lr_schedule(train_cfg), b1=b1, b2=b2,
                           weight_decay=train_cfg.weight_decay))
  return optax.chain(*parts)


def dummy_latents(model: uvit.UViT, batch: int = 1):
  z = jnp.zeros((batch, model.latent_size, model.latent_size, model.latent_channels))
  clip = jnp.zeros((batch, 1, model.clip_img_dim))
  text = jnp.zeros((batch, model.num_text_tokens, model.text_dim))
  t = jnp.zeros((batch,))
  return z, clip, text, t, t, jnp.ones((batch,), jnp.int32)


def init_fn(model: uvit.UViT, tx: optax.GradientTransformation, seed: int) -> Callable[[], TrainState]:
  """A thunk that builds the boxed initial state (for eval_shape and sharded jit)."""
  def init():
    params = model.init(rng.key_for(seed, 0, "init"), *dummy_latents(model))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=tx.init(params))
  return init


# ---------------------------------------------------------------- the step

def make_train_step(model: uvit.UViT, tx, encoders: encoders_lib.Encoders, config):
  """Returns step(state, encoder_params, batch) -> (state, metrics); jit it with shardings."""
  accum = int(config.train.grad_accum)
  ema_decay = float(config.train.ema_decay)
  seed = int(config.seed)
  lr_fn = lr_schedule(config.train)

  def micro_loss(params, encoder_params, batch, key):
    k_enc, k_loss = jax.random.split(key)
    z0, clip0, text0 = encoders.batch_to_latents(encoder_params, batch, k_enc)
    nnet = functools.partial(model.apply, {"params": params})
    loss, parts = objective.loss_fn(nnet, z0, clip0, text0, batch.get("data_type"), k_loss)
    parts = {k: v for k, v in parts.items() if k.startswith("loss")}
    return loss, parts

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(state: TrainState, encoder_params, batch):
    key = rng.key_for(seed, state.step, "train")
    batch = {k: v for k, v in batch.items() if k != "skipped"}
    if accum == 1:
      (loss, parts), grads = grad_fn(state.params, encoder_params, batch, key)
    else:
      # Microbatch i takes every accum-th example, so each device keeps its own
      # rows (a contiguous split would move data between devices).
      def micro(i, b):
        return jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:])[:, i], b)

      def body(carry, i):
        g_sum, l_sum, p_sum = carry
        (l, p), g = grad_fn(state.params, encoder_params, micro(i, batch), jax.random.fold_in(key, i))
        return (jax.tree.map(jnp.add, g_sum, g), l_sum + l,
                jax.tree.map(jnp.add, p_sum, p)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      p0 = {k: jnp.zeros(()) for k in ("loss_img", "loss_clip", "loss_text")}
      (grads, loss, parts), _ = jax.lax.scan(body, (zeros, jnp.zeros(()), p0), jnp.arange(accum))
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss = loss / accum
      parts = jax.tree.map(lambda p: p / accum, parts)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optax.incremental_update(params, state.ema_params, step_size=1.0 - ema_decay)
    new_state = TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
    out = dict(loss=loss, grad_norm=optax.global_norm(grads), lr=lr_fn(state.step), **parts)
    return new_state, out

  return step


def compile_train_step(step_fn, mesh, state_shardings, encoder_shardings):
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(
      step_fn,
      in_shardings=(state_shardings, encoder_shardings, None),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,),
  )


# ---------------------------------------------------------------- the loop

def create_state(model, tx, config, mesh):
  rules = sharding.rules_from_config(config.sharding.rules)
  return sharding.sharded_init(init_fn(model, tx, int(config.seed)), mesh, rules)


def train(config: ml_collections.ConfigDict, workdir: str, *, data_iterator=None) -> dict:
  """Trains until config.train.steps, resuming from the newest checkpoint in `workdir`.

  Returns the last logged scalars. `data_iterator` overrides the configured
  data (tests use this); it must be a grain DatasetIterator of host batches.
  """
  from data_pipelines import sources  # data is only needed by training

  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_divisible(config.train.batch_size, mesh)
  if config.train.batch_size % config.train.grad_accum:
    raise sharding.ConfigError(
        f"config.train.batch_size={config.train.batch_size} is not divisible by "
        f"config.train.grad_accum={config.train.grad_accum}")
  model = make_model(config.model)
  tx = make_optimizer(config.train)
  encoders = encoders_lib.build(config.encoders, model)
  encoder_params, encoder_shardings = encoders.load_params(config.encoders, mesh, config)

  state, state_shardings = create_state(model, tx, config, mesh)
  if data_iterator is None:
    data_iterator = sources.make_train_iterator(config, jax.process_index(), jax.process_count())

  mngr = checkpoints.manager(workdir, save_every=config.train.checkpoint_every,
                             keep=config.train.keep_checkpoints)
  restored = checkpoints.restore_latest(
      mngr, checkpoints.abstract_with_shardings(state, state_shardings), data_iterator)
  if restored is not None:
    start_step, state, data_iterator = restored
    log.info("resumed from step %d in %s", start_step, workdir)
  else:
    start_step = 0

  step_fn = compile_train_step(make_train_step(model, tx, encoders, config), mesh,
                               state_shardings, encoder_shardings)
  total = int(config.train.steps)
  logger = metrics.MetricLogger(workdir, total_steps=total, start_step=start_step,
                                every=config.train.log_every,
                                examples_per_step=config.train.batch_size)
  skipped_total = None
  last = {}
  config_dict = config.to_dict()
  with mesh:
    for step in range(start_step + 1, total + 1):
      host_batch = next(data_iterator)
      skipped = host_batch.pop("skipped", None)
      if skipped is not None:
        skipped_total = skipped if skipped_total is None else skipped_total + skipped
      state, step_metrics = step_fn(state, encoder_params, sharding.to_global(host_batch, mesh))
      host = sources.skip_metrics(skipped_total) if step % config.train.log_every == 0 else None
      last = logger.step(step, step_metrics, host) or last
      checkpoints.save(mngr, step, state, data_iterator, config_dict, force=(step == total))
  last = logger.flush(total, sources.skip_metrics(skipped_total)) or last
  logger.close()
  mngr.wait_until_finished()
  mngr.close()
  return last
