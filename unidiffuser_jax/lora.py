"""LoRA for the U-ViT: low-rank adapters on chosen Dense layers, without forking the model.

A fine-tune with config.train.lora.rank = r > 0 trains, for every Dense layer of the U-ViT
whose module path (e.g. "in_blocks_0/attn/qkv") fully matches config.train.lora.targets,

  y = x W + b + (alpha / r) * dropout(x) A B,    A [in, r] (uniform +-1/sqrt(in)), B [r, out] = 0

(peft's LoRA; B = 0 makes step 0 the base model). The model code is unchanged: during the loss
a flax method interceptor (`applied`) computes those Dense calls of the U-ViT with the kernel
W + (alpha / r) A B made inside the layer (float32; recomputed under remat, never a second copy
of the model), or with dropout, which acts on the adapters' input and has no merged form, adds
the low-rank term to the layer's output. For sampling and export `merge` folds the adapters into
the kernels once. All forms agree to 1e-5 (tests/test_lora.py).

In training the base weights are a frozen input of the step (next to the encoders: no gradient,
no optimizer state, stored in train.lora.base_dtype), and the state's params / EMA / optimizer
state hold the adapters alone, so checkpoints, resume, EMA and metrics are the ordinary ones
and a checkpoint holds only adapters. A and B carry the logical axis names of the kernel they
adapt (A: (in, None), B: (None, out)), so the config's sharding rules lay them out like it.

The adapters' file (--mode=export, `save_adapters`) records which base they were trained on
(its name and a hash of its values: `base_identity`) and the LoRA config; `load_adapters`
refuses a file whose base differs from the one it is applied to.
"""
import contextlib
import dataclasses
import hashlib
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from unidiffuser_jax import checkpoints, rng, sharding
from unidiffuser_jax.errors import ConfigError
from unidiffuser_jax.models import uvit
from unidiffuser_jax.weights.tensors import load_metadata, load_tensors, save_safetensors

A, B = "lora_a", "lora_b"
FORMAT = "unidiffuser-jax-lora"
BASE_RECORD = "lora_base.json"   # in a LoRA run's workdir: the base it fine-tunes (base_identity)
BASE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int
  alpha: float
  dropout: float
  targets: str
  base_dtype: str = "float32"

  @property
  def scale(self) -> float:
    return float(self.alpha) / int(self.rank)

  @classmethod
  def from_config(cls, lora_cfg) -> "LoraConfig":
    c = cls(rank=int(lora_cfg.rank), alpha=float(lora_cfg.alpha), dropout=float(lora_cfg.dropout),
            targets=str(lora_cfg.targets), base_dtype=str(lora_cfg.base_dtype))
    if c.rank < 0:
      raise ConfigError(f"config.train.lora.rank={c.rank}; use 0 (full fine-tuning) or more")
    if not 0.0 <= c.dropout < 1.0:
      raise ConfigError(f"config.train.lora.dropout={c.dropout}; use a value in [0, 1)")
    if c.base_dtype not in BASE_DTYPES:
      raise ConfigError(f"config.train.lora.base_dtype={c.base_dtype!r}; use one of {BASE_DTYPES}")
    try:
      re.compile(c.targets)
    except re.error as e:
      raise ConfigError(f"config.train.lora.targets={c.targets!r} is not a regex: {e}") from None
    return c

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def enabled(config) -> bool:
  return int(config.train.lora.rank) > 0


# ---------------------------------------------------------------- which layers, which shapes

def _name(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def targets(abstract_params, pattern: str) -> dict[str, tuple[tuple[int, int], tuple]]:
  """{module path: ((in, out), (in axis name, out axis name))} of the Dense kernels (2-D
  `kernel` leaves) whose module path fully matches `pattern`; `abstract_params` may be boxed."""
  found = {}
  flat = jax.tree_util.tree_flatten_with_path(
      abstract_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  for path, leaf in flat:
    name = _name(path)
    module, _, last = name.rpartition("/")
    if last != "kernel" or not re.fullmatch(pattern, module):
      continue
    value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
    if len(value.shape) != 2:
      continue
    names = leaf.names if isinstance(leaf, nn.Partitioned) else (None, None)
    found[module] = (tuple(value.shape), tuple(names))
  if not found:
    raise ConfigError(f"config.train.lora.targets={pattern!r} matches no Dense layer of the U-ViT "
                      f"(module paths look like 'in_blocks_0/attn/qkv', 'mid_block/mlp/fc1')")
  return found


def _nest(flat: dict[str, object]) -> dict:
  tree: dict = {}
  for name, value in flat.items():
    node = tree
    parts = name.split("/")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = value
  return tree


def flatten(adapters) -> dict[str, dict]:
  """Nested adapter tree -> {module path: {lora_a, lora_b}}."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0]:
    name = _name(path)
    module, _, which = name.rpartition("/")
    out.setdefault(module, {})[which] = leaf
  return out


def init_adapters(found: dict, rank: int, key) -> dict:
  """Boxed adapters for `targets(...)`: A uniform in +-1/sqrt(in) (peft's kaiming init), B zero."""
  flat = {}
  for module, ((d_in, d_out), (in_name, out_name)) in found.items():
    k = jax.random.fold_in(key, rng.purpose_id(module))
    bound = 1.0 / np.sqrt(d_in)
    a = jax.random.uniform(k, (d_in, rank), jnp.float32, -bound, bound)
    flat[module + "/" + A] = nn.Partitioned(a, (in_name, None))
    flat[module + "/" + B] = nn.Partitioned(jnp.zeros((rank, d_out), jnp.float32), (None, out_name))
  return _nest(flat)


# ---------------------------------------------------------------- applying them

@contextlib.contextmanager
def applied(adapters, scale: float, dropout: float = 0.0, dropout_key=None):
  """Within this context (while tracing), every U-ViT Dense call named by `adapters` computes
  x (W + scale A B) + b, the merged kernel made inside the layer (so it lives as long as the
  layer's own temporaries and is recomputed under remat), or with dropout > 0, which acts on
  the adapters' input and has no merged form, x W + b + scale * dropout(x) A B. Other modules
  (the encoders' Dense layers) are untouched."""
  by_path = {tuple(m.split("/")): ab for m, ab in flatten(adapters).items()}
  inside = []   # UViT calls being traced (remat'd blocks have no module parent to walk up)

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, uvit.UViT) and context.method_name == "__call__":
      inside.append(module)
      try:
        return next_fun(*args, **kwargs)
      finally:
        inside.pop()
    if context.method_name != "__call__" or not isinstance(module, nn.Dense) or not inside:
      return next_fun(*args, **kwargs)
    ab = by_path.get(tuple(module.path))
    if ab is None:
      return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    if dropout == 0.0:
      return _merged_dense(module, x, ab, scale)
    y = next_fun(*args, **kwargs)
    k = jax.random.fold_in(dropout_key, rng.purpose_id("/".join(module.path)))
    keep = jax.random.bernoulli(k, 1.0 - dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - dropout), jnp.zeros_like(x))
    dt = module.dtype or x.dtype
    delta = (x.astype(dt) @ ab[A].astype(dt)) @ ab[B].astype(dt)
    return y + (scale * delta).astype(y.dtype)

  with nn.intercept_methods(interceptor):
    yield


def _merged_dense(module: nn.Dense, x, ab, scale: float):
  """nn.Dense's computation (same dtype promotion and contraction) with its kernel + scale A B."""
  kernel = module.get_variable("params", "kernel")
  bias = module.get_variable("params", "bias") if module.use_bias else None
  w = jnp.asarray(kernel, jnp.float32) + scale * (jnp.asarray(ab[A], jnp.float32) @
                                                  jnp.asarray(ab[B], jnp.float32))
  x, w, bias = module.promote_dtype(x, w, bias, dtype=module.dtype)
  y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=module.precision)
  return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


def merge(params: dict, adapters, scale: float) -> dict:
  """params with kernel + scale * A B for every adapted layer, in float32 (a bfloat16 base's
  kernel is widened first, so a small A B is not rounded away). Jit it to merge on device."""
  flat = flatten(adapters)
  def visit(node, prefix):
    out = {}
    for k, v in node.items():
      name = f"{prefix}{k}"
      if isinstance(v, dict):
        out[k] = visit(v, name + "/")
      elif k == "kernel" and prefix[:-1] in flat:
        ab = flat[prefix[:-1]]
        delta = jnp.asarray(ab[A], jnp.float32) @ jnp.asarray(ab[B], jnp.float32)
        out[k] = jnp.asarray(v, jnp.float32) + scale * delta
      else:
        out[k] = v
    return out
  missing = sorted(set(flat) - {_name(p).rpartition("/")[0] for p, _ in
                                jax.tree_util.tree_flatten_with_path(params)[0]})
  if missing:
    raise ConfigError(f"the adapters name layers this U-ViT does not have: {missing[:4]}")
  return visit(params, "")


# ---------------------------------------------------------------- the base model's identity

def base_identity(params, name: str) -> dict:
  """{name, sha256}: a hash of the base's parameter paths, shapes and float32 values (which
  copy of the weights does not matter, their values do)."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0],
                           key=lambda pl: _name(pl[0])):
    arr = np.ascontiguousarray(np.asarray(leaf, np.float32))
    h.update(f"{_name(path)}:{arr.shape};".encode())
    h.update(arr.tobytes())
  return {"name": name, "sha256": h.hexdigest()}


def check_base(identity: dict, recorded: dict, what: str) -> None:
  """Refuses (one line) adapters trained on another base than the one given."""
  if identity["sha256"] != recorded.get("sha256"):
    raise ConfigError(
        f"{what} was trained on the base {recorded.get('name')!r} (sha256 "
        f"{str(recorded.get('sha256'))[:12]}...), but the base given is {identity['name']!r} "
        f"(sha256 {identity['sha256'][:12]}...): its weights differ, so the adapters would "
        f"change another model; use the base they were trained on")


def record_run(workdir: str, identity: dict, lcfg: LoraConfig) -> None:
  """Writes the run's base identity and LoRA config into the workdir (BASE_RECORD), or refuses
  a resume on another base or with another LoRA config."""
  path = epath.Path(workdir) / BASE_RECORD
  if path.exists():
    run = json.loads(path.read_text())
    check_base(identity, run["base"], f"the LoRA run in {workdir}")
    if run["lora"] != lcfg.to_dict():
      raise ConfigError(f"the LoRA run in {workdir} was started with config.train.lora "
                        f"{run['lora']}, not {lcfg.to_dict()}; resume it with its own values")
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"base": identity, "lora": lcfg.to_dict()}))


def _run_dir(src: str):
  p = epath.Path(src)
  while not (p / BASE_RECORD).exists() and p.parent != p:
    p = p.parent
  return p if (p / BASE_RECORD).exists() else None


def is_run(src: str) -> bool:
  """Whether `src` (a workdir or a checkpoint in one) belongs to a LoRA run."""
  return bool(src) and _run_dir(src) is not None


def read_run(src: str) -> tuple[dict, LoraConfig]:
  """(base identity, LoraConfig) recorded by the LoRA run at `src` (its workdir or a folder
  inside it, e.g. a checkpoint step)."""
  p = _run_dir(src)
  if p is None:
    raise ConfigError(f"{src} holds LoRA adapters but no {BASE_RECORD} above it: it is not a "
                      f"LoRA run's workdir")
  run = json.loads((p / BASE_RECORD).read_text())
  return run["base"], LoraConfig(**run["lora"])


# ---------------------------------------------------------------- files

def save_adapters(path: str, adapters, lcfg: LoraConfig, base: dict, model_cfg: dict) -> int:
  """Adapters -> safetensors: keys '<module path>/lora_a|lora_b' in our layout ([in, r], [r, out];
  qkv columns (heads, 3, head_dim) as our kernel); metadata: format, base, lora, model."""
  tensors = {f"{m}/{w}": np.asarray(v, np.float32)
             for m, ab in flatten(jax.device_get(adapters)).items() for w, v in ab.items()}
  save_safetensors(path, tensors, {"model": FORMAT, "base": json.dumps(base),
                                   "lora": json.dumps(lcfg.to_dict()),
                                   "config": json.dumps(dict(model_cfg))})
  return int(sum(v.size for v in tensors.values()))


def load_adapters(path: str, base: dict | None = None) -> tuple[dict, LoraConfig, dict]:
  """-> (adapters, LoraConfig, recorded base) from `save_adapters`' file; with `base` (an
  identity) a file trained on another base is refused."""
  if not os.path.isfile(path):
    raise ConfigError(f"LoRA file {path!r} does not exist")
  meta = load_metadata(path)
  if meta.get("model") != FORMAT:
    raise ConfigError(f"{path} is not a LoRA adapters file written by --mode=export "
                      f"(its metadata says model={meta.get('model')!r})")
  recorded = json.loads(meta["base"])
  if base is not None:
    check_base(base, recorded, f"the LoRA file {path}")
  lcfg = LoraConfig(**json.loads(meta["lora"]))
  return _nest(dict(load_tensors(path))), lcfg, recorded


def parse_scales(files: list[str], scales: str) -> list[float]:
  vals = [float(s) for s in str(scales).split(",") if s.strip()] or [1.0]
  if len(vals) == 1:
    vals = vals * len(files)
  if len(vals) != len(files):
    raise ConfigError(f"config.sample.lora_scale has {len(vals)} values for {len(files)} LoRA "
                      f"files; give one per file or one for all")
  return vals


def merge_files(params, files: str, scales: str, base_name: str):
  """params (on device) with each adapters file of the comma list `files` merged at its scale
  (config.sample.lora / lora_scale) by one jitted merge on device; each file's base must be
  `params` (refused otherwise)."""
  paths = [f.strip() for f in str(files).split(",") if f.strip()]
  if not paths:
    return params
  identity = base_identity(params, base_name)
  merged = params
  for path, s in zip(paths, parse_scales(paths, scales)):
    adapters, lcfg, _ = load_adapters(path, identity)
    merged = _merge_jit(merged, adapters, lcfg.scale * s)
  return merged


_merge_jit = jax.jit(merge, static_argnums=2)


def is_adapters(tree) -> bool:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return bool(leaves) and all(_name(p).endswith(("/" + A, "/" + B)) for p, _ in leaves)


def template(model, lcfg: LoraConfig) -> dict:
  """The adapters' shapes (ShapeDtypeStructs) for `model` and `lcfg`."""
  found = targets(uvit.abstract_variables(model)["params"], lcfg.targets)
  return nn.unbox(jax.eval_shape(lambda: init_adapters(found, lcfg.rank, jax.random.key(0))))


def run_adapters(model, src: str) -> tuple[dict, LoraConfig, dict]:
  """-> (EMA adapters, LoraConfig, base identity) of the LoRA run at `src` (a workdir or a
  checkpoint), the adapters checked against `model`."""
  base, lcfg = read_run(src)
  adapters = checkpoints.load_params(src)
  checkpoints.check_params(adapters, template(model, lcfg), f"the LoRA checkpoint {src}",
                           f"config.model with the run's LoRA config {lcfg.to_dict()}")
  return adapters, lcfg, base


def merged_run(src: str, adapters, base_path: str = "") -> dict:
  """The LoRA run at `src`: its base (`base_path`, else the init_from the run recorded) with
  `adapters` merged in, on host; a base other than the run's is refused."""
  recorded, lcfg = read_run(src)
  base_path = base_path or recorded["name"]
  base = checkpoints.load_params(base_path)
  check_base(base_identity(base, base_path), recorded, f"the LoRA run {src}")
  return jax.device_get(_merge_jit(base, adapters, lcfg.scale))


def for_sampling(config, src: str, params, put):
  """The U-ViT params a sampler uses: `params` read from `src` (a LoRA run's adapters are
  merged into their base: config.train.init_from, else the run's), placed by `put`, then the files of
  config.sample.lora merged in on device (before anything is compiled)."""
  if is_adapters(params):
    params = merged_run(src, params, config.train.init_from)
  params = put(params)
  return merge_files(params, config.sample.lora, config.sample.lora_scale,
                     config.sample.checkpoint or src)


def eval_params(config, params, cache: dict):
  """A training-time evaluation's U-ViT params: a LoRA run's EMA adapters (`params`, on device)
  merged into its base (config.train.init_from, loaded once into `cache` and placed like
  `params`); other params as they are."""
  if not is_adapters(params):
    return params
  if "lora_base" not in cache:
    where = jax.tree.leaves(params)[0].sharding
    cache["lora_base"] = jax.device_put(checkpoints.load_params(config.train.init_from), where)
  return _merge_jit(cache["lora_base"], params, LoraConfig.from_config(config.train.lora).scale)


# ---------------------------------------------------------------- the fine-tune

def _base_shardings(model, mesh, rules):
  abstract = uvit.abstract_variables(model)["params"]
  return abstract, sharding.named_shardings(sharding.logical_to_specs(abstract, mesh, rules), mesh)


def load_base(model, path: str, mesh, rules, base_dtype: str):
  """-> (base params on device, their shardings, identity) from `path` (train.init_from)."""
  if not path:
    raise ConfigError("config.train.lora.rank > 0 fine-tunes a trained U-ViT: set "
                      "--config.train.init_from=DIR (an imported params dir or a workdir)")
  abstract, shardings = _base_shardings(model, mesh, rules)
  loaded = checkpoints.load_params(path)
  checkpoints.check_params(loaded, nn.unbox(abstract), f"init_from={path}", "the model config")
  identity = base_identity(loaded, path)
  base = jax.device_put(jax.tree.map(lambda x: np.asarray(x, jnp.dtype(base_dtype)), loaded), shardings)
  return base, shardings, identity


def wrap_task(task, model, lcfg: LoraConfig, seed: int):
  """The LoRA form of the U-ViT task: its params are the adapters; its loss(adapters, frozen,
  batch, key) runs `task`'s loss with frozen["base"] as the U-ViT's params, frozen["encoders"]
  as the encoders', and the adapters applied. The dropout key is the step's key
  (rng.key_for(seed, step, "train/<task>")) folded with the purpose "lora/dropout"."""
  found = targets(uvit.abstract_variables(model)["params"], lcfg.targets)

  def init_params():
    return init_adapters(found, lcfg.rank, rng.key_for(seed, 0, "init/lora"))

  def loss(adapters, frozen, batch, key):
    dkey = jax.random.fold_in(key, rng.purpose_id("lora/dropout"))
    with applied(adapters, lcfg.scale, lcfg.dropout, dkey):
      return task.loss(frozen["base"], frozen["encoders"], batch, key)

  return dataclasses.replace(task, init_params=init_params, loss=loss)


def finetune(task, model, config, mesh, frozen, frozen_shardings, *, workdir: str | None = None,
             abstract: bool = False):
  """A U-ViT fine-tune made a LoRA fine-tune (train.build): -> (task, frozen, frozen_shardings),
  the base (config.train.init_from) a frozen input next to the encoders, recorded in `workdir`
  when given; abstract: the base as ShapeDtypeStructs of train.lora.base_dtype (plans, compiles
  and describe need no weights)."""
  lcfg = LoraConfig.from_config(config.train.lora)
  rules = sharding.rules_from_config(config.sharding.rules)
  if abstract:
    shapes, base_shardings = _base_shardings(model, mesh, rules)
    dtype = jnp.dtype(lcfg.base_dtype)
    base = sharding.abstract_with(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), nn.unbox(shapes)),
        base_shardings)
  else:
    base, base_shardings, identity = load_base(model, config.train.init_from, mesh, rules,
                                               lcfg.base_dtype)
    if workdir is not None:
      record_run(workdir, identity, lcfg)
  return (wrap_task(task, model, lcfg, int(config.seed)), {"encoders": frozen, "base": base},
          {"encoders": frozen_shardings, "base": base_shardings})


def full_config(config):
  """The same config fine-tuning every weight (train.lora.rank 0): describe's comparison."""
  config = config.copy_and_resolve_references()
  config.train.lora.rank = 0
  return config


# ---------------------------------------------------------------- the memory plan

def describe_lines(config, model, tx, mesh, rules, full_bytes: int) -> list[str]:
  """--mode=describe's LoRA lines: per-device bytes of the frozen base, the adapters, their EMA
  and optimizer state, against `full_bytes` (params + EMA + optimizer state of full fine-tuning).
  Parameter state only: activations come on top (the same for both)."""
  lcfg = LoraConfig.from_config(config.train.lora)
  abstract = uvit.abstract_variables(model)["params"]
  found = targets(abstract, lcfg.targets)

  def init():
    adapters = init_adapters(found, lcfg.rank, jax.random.key(0))
    return adapters, adapters, tx.init(adapters)
  boxed = jax.eval_shape(init)
  specs = sharding.logical_to_specs(boxed, mesh, rules)
  ad_b, ema_b, opt_b = (sharding.bytes_per_device(t, s, mesh)
                        for t, s in zip(nn.unbox(boxed), specs))
  dtype = jnp.dtype(lcfg.base_dtype)
  base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), nn.unbox(abstract))
  base_b = sharding.bytes_per_device(base, sharding.logical_to_specs(abstract, mesh, rules), mesh)
  n_ad = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(boxed)[0]))
  total = base_b + ad_b + ema_b + opt_b
  gib = lambda n: f"{n / 2**30:.3f} GiB" if n >= 2**24 else f"{n / 2**20:.2f} MiB"
  return [f"LoRA (train.lora): rank {lcfg.rank}, alpha {lcfg.alpha}, {len(found)} layers, "
          f"{n_ad} adapter params",
          f"per-device bytes, LoRA: base ({lcfg.base_dtype}, frozen) {gib(base_b)}, adapters "
          f"{gib(ad_b)}, ema {gib(ema_b)}, optimizer state {gib(opt_b)}, total {gib(total)} "
          f"(full fine-tuning: {gib(full_bytes)}, {full_bytes / max(total, 1):.1f}x); "
          f"activations not included"]
