"""`--mode=compile`: plan a run before renting the machine.

  python -m unidiffuser_jax.main --mode=compile --config=configs/laion.py --workdir=DIR \\
      --config.compile.topology=v5p:4x4x4            # any libtpu topology name; "" = local devices
  ... --config.compile.sampler=True                  # also each sampling mode's program

The real train step (train.build(abstract=True): the trainer's own build, on ShapeDtypeStructs)
is compiled ahead of time for the configured mesh on the topology's devices (libtpu's
compile-only TPU devices on any machine; the local devices when the topology is empty) for an
abstract features batch of config.compile.batch examples (0: config.train.batch_size rounded to
a multiple of data*fsdp). Nothing is allocated. Per candidate it reports, per device, XLA's
memory plan (arguments / outputs / aliased / temporaries / generated code, peak vs HBM), the
FLOPs per step by XLA's cost analysis and by the analytic count (perf.uvit_train_flops), the
estimated step time and where it comes from, and from it examples/s and MFU:

  step time  XLA's cost_analysis()['optimal_seconds'] only when it is sane (positive and not
             below the roofline's own lower bound); otherwise the roofline of perf.py:
             max(XLA FLOPs / peak, bytes accessed / HBM bandwidth, collective bytes / ICI
             bandwidth) per device, peaks from perf.CHIPS (on CPU: the measured matmul peak,
             compute only)
  MFU        analytic model FLOPs / (step time x devices x peak FLOP/s per device); printed
             as "<=" when the step time is the roofline's (a lower bound of the time), next
             to the MFU of the no-overlap roofline (the sum of the three times, mfu_serial):
             a real step overlaps much of its HBM traffic and collectives with compute
             (faster than the sum) but runs its matmuls below the peak the roofline assumes,
             so neither is a bound on what the chip will do; benchmarks/README.md quotes the
             sum as the estimate. XLA counts nothing inside Pallas kernels (splash attention):
             the roofline takes the larger of its FLOPs and the analytic count

Each candidate compiles in a child process (config.compile.isolate), so a compiler abort
(libtpu can SIGABRT) is one row of the report with the signal and the last lines the
compiler printed, not a dead run (libtpu 0.0.42.1 aborted the laion step on v5p:2x2x1 on the
position tables' gradient; configs/common.py's pos_width rule avoids it, benchmarks/README.md,
"The v5p compiler abort"; LIBTPU_INIT_ARGS=--xla_tpu_enable_all_reduce_scatter_fusion=false is
the blunt alternative). Writes <workdir>/compile/<candidate>.hlo.txt (the optimised
per-device HLO) and <workdir>/compile/report.json.
"""
import dataclasses
import importlib.util
import json
import math
import multiprocessing
import os
import re
import sys
import time

import jax
import jax.numpy as jnp

from unidiffuser_jax import aot, errors, perf, sample, search, sharding, train, vocab
from unidiffuser_jax import encoders as encoders_lib
from unidiffuser_jax.diffusion import modes
from unidiffuser_jax.models import uvit

LIBTPU_INSTALL = "pip install -r requirements-tpu.txt"
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
                "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def libtpu_available() -> bool:
  return bool(os.environ.get("TPU_LIBRARY_PATH")) or importlib.util.find_spec("libtpu") is not None


def devices_for(topology: str) -> list:
  """The compile targets: libtpu's compile-only devices of `topology`, or the local devices."""
  if not topology:
    return jax.devices()
  from jax.experimental import topologies  # local: asks libtpu, only for a named topology
  # A v4 chip's two TensorCores are one device in practice ("megacore"); libtpu's default for v4
  # names is a device per core, which jax.make_mesh refuses. v5p names give megacore chips as is.
  kwargs = {"chip_config_name": "megacore"} if topology.startswith("v4") else {}
  try:
    return list(topologies.get_topology_desc(topology, "tpu", **kwargs).devices)
  except (RuntimeError, ValueError) as e:
    raise errors.ConfigError(f"config.compile.topology={topology!r}: libtpu says "
                             f"{str(e).splitlines()[0]}") from None


def global_batch(config, mesh) -> int:
  """config.compile.batch (0: config.train.batch_size), rounded to a multiple of data*fsdp."""
  n = sharding._axis_size(mesh, sharding.BATCH_AXES)  # pylint: disable=protected-access
  want = int(config.compile.batch) or int(config.train.batch_size)
  return max(n, round(want / n) * n)


def collective_bytes(hlo_text: str) -> int:
  """Bytes the collectives of an optimised per-device HLO module produce (their result
  shapes): the ICI traffic of one step, to first order."""
  total = 0
  for line in hlo_text.splitlines():
    m = re.search(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(_COLLECTIVES) + r")(-start)?\(", line)
    if not m:
      continue
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
      if dtype in _DTYPE_BYTES:
        total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def step_estimate(optimal, roof: dict, peak_note: str) -> tuple[float, str]:
  """(seconds, where they come from): XLA's optimal_seconds when it is sane (finite and not
  below the roofline's lower bound: XLA has reported negative times and times below what its
  own FLOP count needs at the chip's peak), otherwise the roofline's bound."""
  if optimal is not None and math.isfinite(optimal) and optimal >= 0.99 * roof["seconds"]:
    return float(optimal), "XLA cost_analysis optimal_seconds"
  why = "missing" if optimal is None else f"{optimal:.3g} s rejected, below the roofline"
  return roof["seconds"], f"roofline, {roof['bound']}-bound ({peak_note}; XLA optimal_seconds {why})"


def hbm_bytes(config, device) -> float:
  """Memory per device to plan against: config.compile.hbm_gib, else the chip's, else (CPU)
  host RAM / local devices."""
  chip = perf.chip_for(device)
  if float(config.compile.hbm_gib):
    return float(config.compile.hbm_gib) * 2**30
  if chip:
    return chip.hbm_gib * 2**30
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return ram / len(jax.local_devices())


@dataclasses.dataclass
class Candidate:
  name: str          # "train" or "sample/<task>"
  batch: int = 0     # global batch (train) or samples per program call (sample)


def _abstract_sample_inputs(task: str, model, encoders, enc_params, mesh, batch: int) -> dict:
  """Abstract per-batch inputs of sample.mode_program(task), split over (data, fsdp)."""
  names = sample.TASKS[task].inputs
  bs = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(
      shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
  z = bs((batch, model.latent_size, model.latent_size, model.latent_channels))
  clip = bs((batch, 1, model.clip_img_dim))
  inputs = {}
  if "prompts" in names:
    tokens = jax.ShapeDtypeStruct((batch, encoders.text_length), jnp.int32)
    text = jax.eval_shape(encoders.text_latent, enc_params, tokens)
    inputs["text"] = bs(text.shape, text.dtype)
  if "images" in names or "image_pairs" in names:
    inputs.update(z=z, clip=clip)
  if "image_pairs" in names:
    inputs.update(z2=z, clip2=clip)
  return inputs


def _lower(config, cand: Candidate, mesh):
  """(lowered, analytic model FLOPs of one call or None, examples per call)."""
  if cand.name == "train":
    train.check_config(config, config.train, mesh)
    built = train.build(config, mesh, abstract=True)
    flops = perf.uvit_train_flops(uvit.from_config(config.model), cand.batch)
    return aot.lower_train(built, config, cand.batch), flops, cand.batch
  task = cand.name.split("/", 1)[1]
  model = uvit.from_config(config.model)
  encoders = encoders_lib.build(config.encoders)
  built = train.build(config, mesh, abstract=True, encoders=encoders)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                        built.state.ema_params)  # sampling replicates the weights (sample.py)
  inputs = _abstract_sample_inputs(task, model, encoders, built.frozen, mesh, cand.batch)
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), cand.batch))
  keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=sharding.batch_sharding(mesh, 1))
  shapes = modes.LatentShapes(
      z=(model.latent_size, model.latent_size, model.latent_channels),
      clip=(1, model.clip_img_dim), text=(model.num_text_tokens, model.text_dim))
  program = sample.sampler_program(task, config, model, encoders, shapes, mesh)
  return program.lower(params, built.frozen, inputs, keys), None, cand.batch


def analyse(config, cand: Candidate, devices, out_dir: str) -> dict:
  """Compiles one candidate here and returns its report row (see the module docstring)."""
  mesh_cfg = dict(config.mesh)
  mesh = sharding.make_mesh(mesh_cfg, devices=devices)
  if cand.name == "train":
    cand = dataclasses.replace(cand, batch=global_batch(config, mesh))
  elif not cand.batch:
    cand = dataclasses.replace(cand, batch=int(config.sample.batch_size))
  dev = mesh.devices.flat[0]
  n_dev = mesh.devices.size
  row = dict(candidate=cand.name, batch=cand.batch, devices=n_dev, device_kind=dev.device_kind,
             mesh=dict(mesh.shape))
  t0 = time.perf_counter()
  try:
    lowered, model_flops, examples = _lower(config, cand, mesh)
    t1 = time.perf_counter()
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return dict(row, status="does not fit", error=str(e).splitlines()[0])
  t2 = time.perf_counter()
  row.update(lower_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2))
  hlo = compiled.as_text()
  safe = cand.name.replace("/", "_")
  row["hlo"] = os.path.join(out_dir, f"{safe}.hlo.txt")
  with open(row["hlo"], "w") as f:
    f.write(hlo)

  mem = compiled.memory_analysis()
  chip = perf.chip_for(dev)
  hbm = hbm_bytes(config, dev)
  peak_mem = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
              + mem.temp_size_in_bytes)
  row["memory"] = dict(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
                       aliased=mem.alias_size_in_bytes, temporaries=mem.temp_size_in_bytes,
                       code=mem.generated_code_size_in_bytes, peak=peak_mem, hbm=hbm)
  row["fits"] = peak_mem <= hbm
  row["status"] = "ok" if row["fits"] else "does not fit"

  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  xla_flops = float(cost.get("flops", 0.0))
  accessed = float(cost.get("bytes accessed", 0.0))
  optimal = cost.get("optimal_seconds")
  ici = collective_bytes(hlo)
  row.update(xla_flops_per_device=xla_flops, bytes_accessed_per_device=accessed,
             collective_bytes_per_device=ici, xla_optimal_seconds=optimal,
             model_flops=model_flops,
             model_flops_per_device=model_flops / n_dev if model_flops else None)

  peak_flops, peak_src = perf.device_peak_flops(dev, len(jax.local_devices()))
  spec = chip or perf.Chip("cpu", peak_flops, hbm / 2**30, math.inf, math.inf)
  roof = perf.roofline_seconds(max(xla_flops, (model_flops or 0) / n_dev), accessed, ici, spec)
  row["roofline"] = roof
  seconds, source = step_estimate(optimal, roof, peak_src + (" peak" if chip else
                                                               " peak, compute only"))
  row.update(step_seconds=seconds, step_seconds_source=source, peak_flops_per_device=peak_flops,
             peak_source=peak_src, examples_per_s=examples / seconds if seconds > 0 else None)
  row["mfu"] = (model_flops / (seconds * n_dev * peak_flops)
                if model_flops and seconds > 0 else None)
  row["mfu_serial"] = (model_flops / (roof["serial_s"] * n_dev * peak_flops)
                       if model_flops and roof["serial_s"] > 0 else None)
  return row


def _child(config, cand: Candidate, topology: str, out_dir: str, result: str, log: str) -> None:
  """A child process: compile one candidate, write its row as JSON, exit without teardown
  (libtpu's compile-only client can crash while tearing down)."""
  fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
  os.dup2(fd, 2)
  try:
    row = analyse(config, cand, devices_for(topology), out_dir)
  except (errors.ConfigError, ValueError) as e:
    row = dict(candidate=cand.name, status="error", error=str(e))
  with open(result, "w") as f:
    json.dump(row, f)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)


def run_isolated(config, cand: Candidate, topology: str, out_dir: str) -> dict:
  """analyse() in a spawned child; a crash (e.g. a libtpu SIGABRT) is a row, not our death."""
  safe = cand.name.replace("/", "_")
  result, log = (os.path.join(out_dir, f"{safe}.{ext}") for ext in ("json", "log"))
  for path in (result, log):
    if os.path.exists(path):
      os.remove(path)
  env = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}  # compile-only clients touch no chip
  if topology:
    env["JAX_PLATFORMS"] = "cpu"   # the host backend; the TPU devices are compile-only
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    proc = multiprocessing.get_context("spawn").Process(
        target=_child, args=(config, cand, topology, out_dir, result, log))
    proc.start()
    proc.join()
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  if os.path.exists(result):
    with open(result) as f:
      return json.load(f)
  with open(log, errors="replace") as f:
    tail = [line.rstrip() for line in f.readlines()[-40:]]
  check = next((line for line in reversed(tail) if "Check failed" in line or "Error" in line),
               tail[-1] if tail else "")
  how = f"signal {-proc.exitcode}" if proc.exitcode and proc.exitcode < 0 else f"exit {proc.exitcode}"
  return dict(candidate=cand.name, status="crashed", error=f"compiler died ({how}): {check}",
              log=log)


def candidates(config) -> list[Candidate]:
  c = config.compile
  out = [Candidate("train")]
  if c.sampler:
    tasks = tuple(c.sample_tasks) or tuple(sample.TASKS)
    unknown = sorted(set(tasks) - set(sample.TASKS))
    if unknown:
      raise errors.ConfigError(f"config.compile.sample_tasks: unknown {unknown}; use some of "
                               f"{tuple(sample.TASKS)}")
    out += [Candidate(f"sample/{t}", int(c.sample_batch)) for t in tasks]
  return out


def _gib(n) -> str:
  return f"{n / 2**30:.3f} GiB" if n >= 2**26 else f"{n / 2**20:.2f} MiB"


def format_row(row: dict) -> str:
  head = f"[{row['candidate']}]"
  if row["status"] in ("crashed", "error") or "memory" not in row:
    return f"{head} {row['status'].upper()}: {row.get('error', '')}"
  m, roof = row["memory"], row["roofline"]
  lines = [
      f"{head} {row['devices']} x {row['device_kind']}, mesh {row['mesh']}, batch {row['batch']}; "
      f"lowered {row['lower_s']} s, compiled {row['compile_s']} s",
      f"  per device: arguments {_gib(m['arguments'])} | outputs {_gib(m['outputs'])} | aliased "
      f"{_gib(m['aliased'])} | temporaries {_gib(m['temporaries'])} | code "
      f"{m['code'] / 2**20:.1f} MiB",
      f"  peak {_gib(m['peak'])} of {_gib(m['hbm'])} -> "
      f"{'FITS' if row['fits'] else 'DOES NOT FIT'} ({100 * m['peak'] / m['hbm']:.0f}%)",
      f"  FLOPs per device per step: XLA {row['xla_flops_per_device'] / 1e12:.4g} T | analytic "
      + (f"{row['model_flops_per_device'] / 1e12:.4g} T" if row["model_flops_per_device"]
         else "n/a (sampler)")
      + f"; bytes accessed {_gib(row['bytes_accessed_per_device'])}, collectives "
      f"{_gib(row['collective_bytes_per_device'])}",
      f"  step {row['step_seconds'] * 1e3:.4g} ms [{row['step_seconds_source']}] -> "
      f"{row['examples_per_s']:.4g} examples/s"
      + (f", MFU {'<= ' if row['step_seconds_source'].startswith('roofline') else ''}"
         f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else ""),
      f"  roofline per device: compute {roof['compute_s'] * 1e3:.4g} ms | HBM "
      f"{roof['hbm_s'] * 1e3:.4g} ms | ICI {roof['ici_s'] * 1e3:.4g} ms"
      + (f"; nothing overlapping: {roof['serial_s'] * 1e3:.4g} ms, MFU "
         f"{100 * row['mfu_serial']:.1f}%" if row.get("mfu_serial") is not None else "")]
  return "\n".join(lines)


def run(config, workdir: str) -> list[dict]:
  """--mode=compile: every candidate, one row each; prints them and writes the report."""
  c = config.compile
  topology = str(c.topology)
  if topology and not libtpu_available():
    print(f"--mode=compile for topology {topology} needs libtpu (the TPU compiler; no TPU "
          f"needed): {LIBTPU_INSTALL}", flush=True)
    return []
  try:   # vocabulary sizes from the tokenizers when they are here (a laptop may lack them)
    vocab.derive(config)
  except errors.ConfigError as e:
    print(f"note: {str(e).split(';')[0]}; planning with the models' default (released) "
          f"vocabularies", flush=True)
  out_dir = os.path.join(workdir, "compile")
  os.makedirs(out_dir, exist_ok=True)
  if c.search:
    devices = devices_for(topology)
    rows = search.run(config, workdir, devices, hbm_bytes(config, devices[0]),
                      lambda cfg, d: run_isolated(cfg, Candidate("train"), topology, d))
    print(search.format_table(rows), flush=True)
    _write_report(out_dir, topology, rows, "search.json")
    return rows
  rows = []
  for cand in candidates(config):
    if c.isolate:
      row = run_isolated(config, cand, topology, out_dir)
    else:
      row = analyse(config, cand, devices_for(topology), out_dir)
    print(format_row(row), flush=True)
    rows.append(row)
  _write_report(out_dir, topology, rows, "report.json")
  return rows


def _write_report(out_dir: str, topology: str, rows: list, name: str) -> None:
  report = dict(topology=topology or "local", jax=jax.__version__, rows=rows)
  with open(os.path.join(out_dir, name), "w") as f:
    json.dump(report, f, indent=1, default=str)
  print(f"report: {os.path.join(out_dir, name)}", flush=True)
