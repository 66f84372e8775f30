"""The one build (train.build / build_task): abstract and real builds agree, and the step
carries the models' activation constraints into every program, whoever lowers it."""
import re

import jax
import numpy as np
import pytest

from configs import demo
from data_pipelines import synthetic
from unidiffuser_jax import aot, sharding, train, vocab
from unidiffuser_jax.models import uvit

MESH = dict(data=2, fsdp=2, tensor=2)


@pytest.fixture(scope="module")
def tiny():
  config = vocab.derive(demo.get_config("tiny"))
  config.mesh = dict(MESH, num_devices=0)
  return config


def _host_batch(config):
  return next(synthetic.make_iterator(
      resolution=config.data.resolution, clip_resolution=config.data.clip_resolution,
      max_length=config.data.max_length, vocab_size=60, host_batch=config.train.batch_size,
      seed=3))


def _described(tree, with_sharding=True):
  """[(key path, shape, dtype[, sharding])] of every leaf (arrays or ShapeDtypeStructs)."""
  return [(jax.tree_util.keystr(p), x.shape, x.dtype) + ((x.sharding,) if with_sharding else ())
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _pinned(text: str) -> int:
  """Activation constraints to batch sharding in a lowered program."""
  return len(re.findall(r'sdy.sharding_constraint [^\n]*\[\{"data", "fsdp"\}', text))


def test_abstract_build_is_eval_shape_of_the_real_one(tiny):
  mesh = sharding.make_mesh(tiny.mesh)
  real = train.build(tiny, mesh)
  abstract = train.build(tiny, mesh, abstract=True)
  shaped = jax.eval_shape(lambda: (real.state, real.frozen))  # shapes and dtypes only
  assert _described(abstract.state, False) == _described(shaped[0], False)
  assert _described(abstract.frozen, False) == _described(shaped[1], False)
  # ... and the shardings of the real arrays, leaf by leaf.
  assert _described(abstract.state) == _described(real.state)
  assert _described(abstract.frozen) == _described(real.frozen)
  assert abstract.state_shardings == real.state_shardings
  assert abstract.frozen_shardings == real.frozen_shardings
  # The layout is a real split, not everything replicated.
  assert sum(s.spec != jax.sharding.PartitionSpec()
             for s in jax.tree.leaves(real.state_shardings)) > 20

  # Both lower to the same program, with the activation constraints in it, although nothing
  # here enters sharding.tracing_context: the step traces under the config's rules by itself.
  host = _host_batch(tiny)
  batch = sharding.to_global(host, mesh)
  abstract_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                               sharding=x.sharding), batch)
  text = real.lower(batch).as_text()
  assert abstract.lower(abstract_batch).as_text() == text
  assert _pinned(text) >= 3 * tiny.model.depth, _pinned(text)
  # ... and the real step runs (state donated, metrics finite).
  state, metrics = real.step(real.state, real.frozen, batch)
  assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))


def test_compile_and_sampler_paths_carry_the_constraints(tiny):
  """The AOT entry points (aot.lower_train over the abstract build, aot.lower_sampler) on a
  features-format config: the laion U-ViT shrunk to a few channels."""
  from configs import laion
  config = laion.get_config()
  config.model.update(depth=2, width=64, num_heads=2, mlp_dim=128)
  mesh = sharding.make_mesh(MESH)
  built = train.build(config, mesh, abstract=True)
  assert _pinned(aot.lower_train(built, config, 8).as_text()) >= 2 * 3 + 1
  assert _pinned(aot.lower_sampler(config, built.state.ema_params, mesh, 8).as_text()) >= 2 * 3


def test_sampler_program_pins_samples_to_the_data_axes(tiny):
  """The samplers (sample.sampler_program: generate, --mode=compile) carry the U-ViT's
  constraints, with the vmapped samples' axis on (data, fsdp) and the guided pair inside one
  sample unsplit (the legacy `with mesh:` dropped them; naive rules split the pair of 2)."""
  from unidiffuser_jax import compile as compile_plan
  mesh = sharding.make_mesh(tiny.mesh)
  lowered, _, _ = compile_plan._lower(tiny, compile_plan.Candidate("sample/t2i", 8), mesh)  # noqa: SLF001
  text = lowered.as_text()
  constraints = re.findall(r"sdy.sharding_constraint [^\n]*", text)
  assert len(constraints) >= 3 * tiny.model.depth, len(constraints)
  assert all('<@mesh, [{"data", "fsdp"}, {}' in c for c in constraints), constraints[:3]


def test_heldout_loss_carries_the_constraints(tiny):
  """The held-out loss (heldout.HeldoutLoss, --mode=eval and during training) lowers with the
  U-ViT's activation constraints on the data-parallel axes, as the train step does."""
  from unidiffuser_jax import encoders as encoders_lib, heldout
  mesh = sharding.make_mesh(tiny.mesh)
  model = uvit.from_config(tiny.model)
  encoders = encoders_lib.build(tiny.encoders)
  enc_params, _ = train.build_frozen(tiny, mesh, encoders)
  host = {k: v for k, v in _host_batch(tiny).items() if k != "skipped"}
  loss = heldout.HeldoutLoss(tiny, model, encoders, enc_params, mesh, host)
  params = train.build(tiny, mesh, abstract=True, encoders=encoders).state.ema_params
  text = loss._loss.lower(params, enc_params, loss._batch, 500,  # noqa: SLF001
                          jax.random.key(0)).as_text()
  assert _pinned(text) >= 3 * tiny.model.depth, _pinned(text)


def test_no_second_build_remains():
  """No second way to create a train state or jit a step remains (grep-able)."""
  import pathlib
  root = pathlib.Path(__file__).resolve().parents[1]
  banned = ("sharded_init", "create_state", "compile_train_step", "plan_train",
            "eval_shape(train.init_fn", "eval_shape(init_fn", "make_train_step(")
  hits = []
  for path in [*root.glob("unidiffuser_jax/**/*.py"), *root.glob("benchmarks/*.py"),
               *root.glob("tests/**/*.py")]:
    if path.name == "test_build.py":
      continue
    text = path.read_text()
    for word in banned:
      if word in text and not (path.name == "train.py" and word == "make_train_step("):
        hits.append(f"{path.relative_to(root)}: {word}")
  assert not hits, hits
