"""Training UniDiffuser's U-ViT, top to bottom: state, step, loop, periodic actions.

Read `train()` from top to bottom: build the mesh and the model, create (or
restore) the sharded state, then loop: next batch -> jitted step -> metrics ->
checkpoint. Everything random comes from rng.key_for(seed, step, purpose), and
the data iterator is checkpointed with the state, so stopping and re-running
the same command continues exactly as an unbroken run.
"""
from collections.abc import Callable
import dataclasses
import functools
import logging
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from unidiffuser_jax import checkpoints, encoders as encoders_lib, errors, eval_training, input_pipeline
from unidiffuser_jax import latent_stats, lora, metrics, nonfinite, perf, preemption, profiling, rng
from unidiffuser_jax import sharding, weight_jobs
from unidiffuser_jax.diffusion import objective
from unidiffuser_jax.models import uvit

log = logging.getLogger(__name__)


@struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: number of finished optimizer steps
  params: dict             # float32 master weights
  ema_params: dict         # exponential moving average of params (used for sampling)
  opt_state: optax.OptState


# ---------------------------------------------------------------- what is trained

@dataclasses.dataclass(frozen=True)
class Task:
  """What the generic loop trains: how to create the parameters and the loss.

  init_params() -> boxed params (logical axis names); loss(params, frozen,
  batch, key) -> (scalar, {name: scalar}); frozen holds the parameters that
  are inputs but not trained (encoders). prepare_batch runs on the host.
  """
  name: str
  init_params: Callable[[], dict]
  loss: Callable
  prepare_batch: Callable[[dict], dict] = lambda batch: batch
  flops_per_example: int = 0   # model FLOPs of one example's step (telemetry: TFLOP/s, MFU); 0 = unknown


def uvit_task(model: uvit.UViT, encoders, seed: int, objective_kw: dict | None = None) -> Task:
  """The UniDiffuser objective on latents from the frozen encoders; objective_kw:
  clean_prob, loss_weight, min_snr_gamma, text_weight (diffusion/objective.py; empty = the
  paper's)."""
  objective_kw = dict(objective_kw or {})
  def init_params():
    return model.init(rng.key_for(seed, 0, "init"), *uvit.dummy_inputs(model))["params"]

  def loss(params, encoder_params, batch, key):
    k_enc, k_loss = jax.random.split(key)
    z0, clip0, text0 = encoders.batch_to_latents(encoder_params, batch, k_enc)
    nnet = functools.partial(model.apply, {"params": params})
    total, parts = objective.loss_fn(nnet, z0, clip0, text0, batch.get("data_type"), k_loss,
                                     **objective_kw)
    return total, {k: v for k, v in parts.items() if k.startswith("loss_")}

  return Task("uvit", init_params, loss, flops_per_example=perf.uvit_train_flops(model, 1))


# ---------------------------------------------------------------- optimiser and state

LR_DECAYS = ("constant", "cosine")


def lr_schedule(train_cfg) -> optax.Schedule:
  """Linear warm-up from 0 to lr over warmup_steps, then constant (U-ViT's recipe) or, with
  lr_decay="cosine", a half cosine from lr down to 0 at train.steps."""
  warm = max(0, int(train_cfg.warmup_steps))
  decay = train_cfg.lr_decay
  if decay == "constant":
    after = optax.constant_schedule(train_cfg.lr)
  elif decay == "cosine":
    after = optax.cosine_decay_schedule(train_cfg.lr, max(1, int(train_cfg.steps) - warm))
  else:
    raise errors.ConfigError(f"config.train.lr_decay={decay!r}; use one of {LR_DECAYS}")
  if warm == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, train_cfg.lr, warm), after], [warm])


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  b1, b2 = train_cfg.betas
  parts = []
  if train_cfg.grad_clip_norm and train_cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(train_cfg.grad_clip_norm))
  parts.append(optax.adamw(lr_schedule(train_cfg), b1=b1, b2=b2,
                           weight_decay=train_cfg.weight_decay))
  return optax.chain(*parts)


def init_fn(task: Task, tx: optax.GradientTransformation) -> Callable[[], TrainState]:
  """A thunk that builds the boxed initial state (for eval_shape and sharded jit)."""
  def init():
    params = task.init_params()
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=tx.init(params))
  return init


# ---------------------------------------------------------------- the step

def make_train_step(task: Task, tx, train_cfg, seed: int):
  """Returns step(state, frozen_params, batch) -> (state, metrics); jit it with shardings."""
  accum = int(train_cfg.grad_accum)
  ema_decay = float(train_cfg.ema_decay)
  lr_fn = lr_schedule(train_cfg)
  grad_fn = jax.value_and_grad(task.loss, has_aux=True)

  def step(state: TrainState, frozen, batch):
    key = rng.key_for(seed, state.step, f"train/{task.name}")
    if accum == 1:
      (loss, parts), grads = grad_fn(state.params, frozen, batch, key)
    else:
      # Microbatch i takes every accum-th example, so each device keeps its own
      # rows (a contiguous split would move data between devices).
      def micro(i):
        return jax.tree.map(
            lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:])[:, i], batch)

      def body(carry, i):
        out = grad_fn(state.params, frozen, micro(i), jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, carry, out), None

      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                           jax.eval_shape(grad_fn, state.params, frozen, micro(0), key))
      summed, _ = jax.lax.scan(body, zeros, jnp.arange(accum))
      (loss, parts), grads = jax.tree.map(lambda x: x / accum, summed)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optax.incremental_update(params, state.ema_params, step_size=1.0 - ema_decay)
    new_state = TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
    out = dict(loss=loss, grad_norm=optax.global_norm(grads), lr=lr_fn(state.step), **parts)
    return new_state, out

  return step


# ---------------------------------------------------------------- the one build

@dataclasses.dataclass(frozen=True)
class Built:
  """A trainer's state and step as one build makes them (build_task / build).

  state and frozen are arrays, or (abstract=True) ShapeDtypeStructs carrying the same
  shardings; step is jitted (state, frozen, batch) -> (state, metrics), with the state
  donated, and always traced under the config's mesh and logical-axis rules
  (sharding.traced_under), so every caller lowers the same program.
  """
  task: Task
  tx: optax.GradientTransformation
  mesh: object
  rules: tuple
  state: TrainState
  state_specs: TrainState
  state_shardings: TrainState
  frozen: dict
  frozen_shardings: dict
  step: Callable

  def lower(self, batch):
    """The step lowered for this state and frozen params and a (possibly abstract) batch."""
    return self.step.lower(self.state, self.frozen, batch)


def build_task(config, train_cfg, task: Task, mesh, frozen, frozen_shardings, *,
               abstract: bool = False) -> Built:
  """The train state of `task` laid out by config.sharding.rules (created directly in its
  shards: jit with out_shardings, so a model larger than one device fits) and its jitted step."""
  rules = sharding.rules_from_config(config.sharding.rules)
  tx = make_optimizer(train_cfg)
  init = sharding.traced_under(init_fn(task, tx), mesh, rules)
  boxed = jax.eval_shape(init)
  specs = sharding.logical_to_specs(boxed, mesh, rules)
  shardings = sharding.named_shardings(specs, mesh)
  if abstract:
    state = sharding.abstract_with(nn.unbox(boxed), shardings)
  else:
    state = jax.jit(lambda: nn.unbox(init()), out_shardings=shardings)()
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  step = jax.jit(
      # nonfinite.guard: a NaN/Inf step changes nothing but the step count (in-graph).
      sharding.traced_under(nonfinite.guard(make_train_step(task, tx, train_cfg, int(config.seed)),
                                            config.debug.poison_steps), mesh, rules),
      in_shardings=(shardings, frozen_shardings, None),
      out_shardings=(shardings, replicated),
      donate_argnums=(0,))
  return Built(task, tx, mesh, rules, state, specs, shardings, frozen, frozen_shardings, step)


def build_frozen(config, mesh, encoders, *, abstract: bool = False) -> tuple[dict, dict]:
  """({part: params}, {part: shardings}) of the frozen encoders, laid out by
  config.sharding.rules: loaded/initialised arrays, or abstract ones."""
  if abstract:
    return encoders.abstract_params(mesh, int(config.seed), config.sharding.rules)
  return encoders.load_params(config.encoders.weights, mesh, int(config.seed),
                              config.sharding.rules)


def build(config, mesh, *, abstract: bool = False, encoders=None, frozen=None,
          workdir: str | None = None) -> Built:
  """The U-ViT trainer's build: model, encoders (default: encoders_lib.build(config.encoders)),
  frozen params (default: build_frozen), task, state and step; with train.lora.rank > 0 the
  LoRA fine-tune's (the state holds the adapters, the base is frozen: lora.finetune, which
  records the base in `workdir` when given). train, describe, --mode=compile, the benchmarks
  and the tests all start here."""
  model = uvit.from_config(config.model)
  encoders = encoders if encoders is not None else encoders_lib.build(config.encoders)
  frozen, frozen_shardings = frozen or build_frozen(config, mesh, encoders, abstract=abstract)
  task = uvit_task(model, encoders, int(config.seed), objective.config_kwargs(config.train))
  if lora.enabled(config):
    task, frozen, frozen_shardings = lora.finetune(task, model, config, mesh, frozen,
                                                   frozen_shardings, workdir=workdir,
                                                   abstract=abstract)
  return build_task(config, config.train, task, mesh, frozen, frozen_shardings,
                    abstract=abstract)


# ---------------------------------------------------------------- the loop

def check_config(config, train_cfg, mesh) -> None:
  sharding.check_batch_divisible(train_cfg.batch_size, mesh)
  if train_cfg.batch_size % train_cfg.grad_accum:
    raise errors.ConfigError(
        f"batch_size={train_cfg.batch_size} is not divisible by grad_accum="
        f"{train_cfg.grad_accum}; make batch_size a multiple of grad_accum")
  micro = train_cfg.batch_size // train_cfg.grad_accum
  sharding.check_batch_divisible(micro, mesh, what="batch_size // grad_accum")


def start_from(state: TrainState, state_shardings, path: str) -> TrainState:
  """Fine-tuning: params and EMA from `path` (an imported params dir or a workdir),
  fresh optimizer state. Every mismatch is named before anything is replaced."""
  loaded = checkpoints.load_params(path)
  checkpoints.check_params(loaded, state.params, f"init_from={path}", "the model config")
  params = jax.device_put(jax.tree.map(lambda a, b: np.asarray(b, a.dtype), state.params, loaded),
                          state_shardings.params)
  return state.replace(params=params, ema_params=params)


def run_loop(config, train_cfg, built: Built, workdir: str, data_iterator, init_from: str = "",
             evaluate: Callable | None = None) -> dict:
  """The loop every trainer shares over its build (build_task): restore, step, log,
  checkpoint; returns last scalars.

  evaluate(step, state) -> {name: scalar}, if given, runs every train_cfg.eval_every
  steps (and at the last step); its scalars and the seconds it took go to TensorBoard.
  """
  task, mesh, frozen = built.task, built.mesh, built.frozen
  state, state_shardings, step_fn = built.state, built.state_shardings, built.step
  mngr = checkpoints.manager(workdir, keep=train_cfg.keep_checkpoints)
  restored = checkpoints.restore_latest(
      mngr, checkpoints.abstract_with_shardings(state, state_shardings), data_iterator,
      step=int(train_cfg.restore_step), restart_data_on_resize=bool(train_cfg.restart_data_on_resize))
  start_step = 0
  if restored is not None:
    start_step, state, data_iterator = restored
    log.info("%s: resumed from step %d in %s", task.name, start_step, workdir)
  elif init_from:
    state = start_from(state, state_shardings, init_from)
    log.info("%s: starting from the weights in %s", task.name, init_from)

  total = int(train_cfg.steps)
  logger = metrics.MetricLogger(workdir, total_steps=total, start_step=start_step,
                                every=train_cfg.log_every, examples_per_step=train_cfg.batch_size,
                                name=task.name,
                                flops_per_step=task.flops_per_example * train_cfg.batch_size)
  skipped_total, last = None, {}
  config_dict = config.to_dict()
  # The step traces under the config's mesh and rules by itself (build_task); the evaluator
  # samples with its own (replicated) layout. The consecutive-NaN counter and the preemption
  # notice are read only where the loop already waits (logging, saving); every exit path
  # waits for the last async save.
  profiler = profiling.StepProfiler(workdir, train_cfg.profile_steps)
  watch = nonfinite.Watch(train_cfg.max_nonfinite_steps)
  notice = preemption.Notice(train_cfg.preemption_grace_s)
  try:
    for step in range(start_step + 1, total + 1):
      host_batch = task.prepare_batch(dict(logger.next_batch(data_iterator)))
      skipped = host_batch.pop("skipped", None)
      if skipped is not None:
        skipped_total = skipped if skipped_total is None else skipped_total + skipped
      profiler.before(step)
      state, step_metrics = step_fn(state, frozen, sharding.to_global(host_batch, mesh))
      profiler.after(step, step_metrics)
      watch.record(step_metrics)
      due = step % train_cfg.log_every == 0
      preempted = notice.reached(step)
      save_due = step % train_cfg.checkpoint_every == 0 or step == total or preempted
      last = logger.step(step, step_metrics, input_pipeline.skip_metrics(skipped_total) if due else None) or last
      if due or save_due:
        watch.check(step)   # raises after too many NaN steps, before anything is saved
      if save_due:
        checkpoints.save(mngr, step, state, data_iterator, config_dict)
      if preempted:
        checkpoints.finish(mngr)
        raise notice.stopped(step, workdir)
      every = int(train_cfg.eval_every)
      if evaluate is not None and every > 0 and (step % every == 0 or step == total):
        t0 = time.perf_counter()
        scalars = evaluate(step, state)
        logger.write_scalars(step, {**scalars, "eval_time_s": time.perf_counter() - t0})
    profiler.stop(state)
    last = logger.flush(total, input_pipeline.skip_metrics(skipped_total)) or last
  finally:
    profiler.stop()   # a trace cut short by an error or a preemption is still written
    notice.close()
    logger.close()
    checkpoints.finish(mngr)
  mngr.close()
  return last


def train(config: ml_collections.ConfigDict, workdir: str, *, data_iterator=None,
          evaluate: Callable | None = None) -> dict:
  """Trains the U-ViT until config.train.steps, resuming from the newest checkpoint in `workdir`.

  Returns the last logged scalars. `data_iterator` overrides the configured
  data (tests use this); it must be a grain DatasetIterator of host batches.
  """
  mesh = sharding.make_mesh(config.mesh)
  check_config(config, config.train, mesh)
  model = uvit.from_config(config.model)
  weight_jobs.check_imported_uvit(model, config.train.init_from, "train.init_from")
  encoders = encoders_lib.build(config.encoders)
  encoder_params, encoder_shardings = build_frozen(config, mesh, encoders)
  make_iterator = lambda: input_pipeline.make_train_iterator(
      config, config.train, jax.process_index(), jax.process_count())
  encoders = latent_stats.fit_or_load(config, encoders, encoder_params, make_iterator, mesh, workdir)
  if data_iterator is None:
    data_iterator = make_iterator()
  built = build(config, mesh, encoders=encoders, frozen=(encoder_params, encoder_shardings),
                workdir=workdir)
  # A LoRA state holds adapters alone: its base came in through the build, not init_from.
  init_from = "" if lora.enabled(config) else config.train.init_from
  evaluate = eval_training.training_evaluate(config, workdir, model, encoders, encoder_params, mesh,
                                             evaluate)
  return run_loop(config, config.train, built, workdir, data_iterator, init_from=init_from,
                  evaluate=evaluate)
