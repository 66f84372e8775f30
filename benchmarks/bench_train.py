"""U-ViT training step and sampling forward: ours (JAX, jitted) vs diffusers' UniDiffuserModel.

  python benchmarks/bench_train.py                 # 44.8M-parameter U-ViT, batch 16, float32
  python benchmarks/bench_train.py --quick         # configs/demo.py:tiny, few steps: sanity only
  taskset -c 1 python benchmarks/bench_train.py --size=demo --threads=1   # configs/demo.py's
                                                   # U-ViT and batch, both sides on one core
  python benchmarks/bench_train.py --hlo_dir=HLO_DIR   # also write our optimised HLO + op census

Both sides do the same work per training step on the same sizes (float32, one
process, every core unless --threads=1):
  UniDiffuser objective (t_img, t_text ~ U{1..1000} per sample, noise the image
  latent + CLIP embedding with t_img and the text latent with t_text, MSE over
  the concatenated noise) -> backward -> AdamW (torch.optim.AdamW with
  foreach=True vs optax.adamw; no clipping) -> EMA of the weights.
Ours is train.make_train_step (the function the trainer jits) on one CPU device;
the reference is diffusers.pipelines.deprecated.unidiffuser.modeling_uvit.
UniDiffuserModel configured as the released post-LN network (GELU MLP, no
timestep MLP, data-type token = v1), torch threads = the machine's cores.

Reported per side: median step time over --steps timed steps after --warmup (the
sides take turns, --block steps each: 1 alternates every step; a training run's steps follow
each other, which --block 4 measures),
achieved GFLOP/s = FLOPs per step / median time, the fraction of the measured
matmul peak (benchmarks/matmul_peak.py, measured in the same run), and the
ratio ours/torch. FLOPs per step are counted two ways: analytically (matmuls
and attention products only: 2*m*n*k each, backward = 2x forward) and by XLA's
compiled.cost_analysis() on our jitted step; the FLOP/s column uses the
ANALYTIC count for both sides so the two are directly comparable. The forward
(sampling) section times one network evaluation at the same batch
(torch.inference_mode vs a jitted model.apply) and reports examples/s.
"""
import argparse
import dataclasses
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from configs import common  # noqa: E402  (ml_collections only)
from configs import demo as demo_config  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Size:
  width: int = 512
  depth: int = 13
  num_heads: int = 8
  mlp_dim: int = 2048
  latent_size: int = 16
  latent_channels: int = 4
  patch_size: int = 2
  text_dim: int = 64
  num_text_tokens: int = 77
  clip_img_dim: int = 512
  batch: int = 16

  @property
  def num_patches(self) -> int:
    return (self.latent_size // self.patch_size) ** 2

  @property
  def num_tokens(self) -> int:  # v1: t_img, t_text, data_type, text, clip_img, patches
    return 3 + self.num_text_tokens + 1 + self.num_patches


FULL = Size()


def demo_size(arg: str | None = None) -> Size:
  """configs/demo.py's U-ViT and training batch (read from the config, not copied); arg as
  its get_config's ("tiny": the tests' depth-2 U-ViT, --quick's size)."""
  c = demo_config.get_config(arg)
  m = c.model
  return Size(width=m.width, depth=m.depth, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
              latent_size=m.latent_size, latent_channels=m.latent_channels,
              patch_size=m.patch_size, text_dim=m.text_dim, num_text_tokens=m.num_text_tokens,
              clip_img_dim=m.clip_img_dim, batch=c.train.batch_size)


def quick_size() -> Size:
  """--quick: configs/demo.py:tiny's U-ViT and batch, the MLP at 4 x width (diffusers' fixed
  ratio; tiny's is 2)."""
  s = demo_size("tiny")
  return dataclasses.replace(s, mlp_dim=4 * s.width)


SIZES = {"full": lambda: FULL, "demo": demo_size, "quick": quick_size}


# ---------------------------------------------------------------- analytic FLOPs


def diffusers_uvit(s: "Size"):
  """diffusers' UniDiffuserModel configured as the released post-LN U-ViT of size `s`."""
  from diffusers.pipelines.deprecated.unidiffuser import modeling_uvit
  if s.mlp_dim != 4 * s.width:
    raise ValueError(f"mlp_dim {s.mlp_dim}: diffusers' UniDiffuserModel fixes it at 4 x width "
                     f"({4 * s.width})")
  return modeling_uvit.UniDiffuserModel(
      text_dim=s.text_dim, clip_img_dim=s.clip_img_dim, num_text_tokens=s.num_text_tokens,
      num_attention_heads=s.num_heads, attention_head_dim=s.width // s.num_heads,
      in_channels=s.latent_channels, out_channels=s.latent_channels, num_layers=s.depth,
      dropout=0.0, attention_bias=False, sample_size=s.latent_size, patch_size=s.patch_size,
      activation_fn="gelu", norm_type="layer_norm", block_type="unidiffuser", pre_layer_norm=False,
      use_timestep_embedding=False, norm_elementwise_affine=True, use_patch_pos_embed=False,
      ff_final_dropout=True, use_data_type_embedding=True)


def our_uvit(s: "Size"):
  """Our U-ViT (v1, float32, no remat) of size `s`: the network diffusers_uvit(s) builds."""
  import jax.numpy as jnp

  from unidiffuser_jax.models import uvit
  return uvit.UViT(version="v1", latent_size=s.latent_size, latent_channels=s.latent_channels,
                   patch_size=s.patch_size, width=s.width, depth=s.depth, num_heads=s.num_heads,
                   mlp_dim=s.mlp_dim, text_dim=s.text_dim, num_text_tokens=s.num_text_tokens,
                   clip_img_dim=s.clip_img_dim, dtype=jnp.float32, remat="none")


def forward_flops(s: Size) -> int:
  """One forward's FLOPs: unidiffuser_jax.perf's count (the trainer's telemetry uses the same)."""
  from unidiffuser_jax import perf
  return perf.uvit_forward_flops(s, s.batch)


def train_flops(s: Size) -> int:
  return 3 * forward_flops(s)  # backward: a gradient for the activations and one for the weights


# ---------------------------------------------------------------- data

def make_batch(s: Size, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return dict(
      z=rng.standard_normal((s.batch, s.latent_size, s.latent_size, s.latent_channels), np.float32),
      clip_img=rng.standard_normal((s.batch, 1, s.clip_img_dim), np.float32),
      text=rng.standard_normal((s.batch, s.num_text_tokens, s.text_dim), np.float32),
      data_type=rng.integers(0, 2, (s.batch,)).astype(np.int32))


def _interleaved_times(fns: dict, warmup: int, steps: int, block: int = 1) -> dict:
  """{name: [seconds per call]}: the sides take turns, `block` consecutive calls each (ours x
  block, torch x block, ours ...), so that a change in the machine's load hits both alike. With
  block 1 every call follows the other side's, whose freed memory and cache contents it inherits;
  a training run calls one step after another (block > 1; the median then reflects that)."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  while min(len(t) for t in times.values()) < steps:
    for name, fn in fns.items():
      for _ in range(min(block, steps - len(times[name]))):
        t0 = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t0)
  return times


# ---------------------------------------------------------------- ours (JAX)

def build_ours(model, loss):
  """train.build_task's state and jitted step for `model`'s parameters and `loss(params, frozen,
  batch, key) -> (total, parts)`, on one device, with the paper's optimiser (configs/common.train:
  AdamW, EMA) and no warm-up or clipping (torch's side has none). The run-level fields the build
  reads (seed, sharding rules, debug) come from a whole config, so a field it starts reading is
  there."""
  import jax

  from unidiffuser_jax import sharding, train
  from unidiffuser_jax.models import uvit

  task = train.Task("bench", lambda: model.init(jax.random.key(0), *uvit.dummy_inputs(model))["params"],
                    loss)
  train_cfg = common.train(lr=1e-4, warmup_steps=0, grad_clip_norm=0.0)
  mesh = sharding.make_mesh(dict(data=1), devices=jax.devices()[:1])
  return train.build_task(demo_config.get_config("tiny"), train_cfg, task, mesh, {}, {})


def jax_side(s: Size, hlo_dir: str | None, compile_only=False) -> dict:
  """Our compiled train step and forward, as closures (`step`, `fwd`) plus their metadata."""
  import jax
  import jax.numpy as jnp

  from unidiffuser_jax.diffusion import objective

  model = our_uvit(s)

  def loss(params, frozen, batch, key):
    del frozen  # the benchmark feeds latents: no frozen encoders
    nnet = lambda *a: model.apply({"params": params}, *a)
    total, parts = objective.loss_fn(nnet, batch["z"], batch["clip_img"], batch["text"],
                                     batch["data_type"], key)
    return total, {k: v for k, v in parts.items() if k.startswith("loss_")}

  built = build_ours(model, loss)
  state = built.state
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  batch = {k: jnp.asarray(v) for k, v in make_batch(s).items()}

  t0 = time.perf_counter()
  compiled = built.lower(batch).compile()
  compile_s = time.perf_counter() - t0
  xla_flops = _cost_flops(compiled)
  if hlo_dir:
    _dump_hlo(compiled, hlo_dir)
  if compile_only:
    return dict(n_params=n_params, compile_s=compile_s, xla_flops=xla_flops, compiled=compiled)

  holder = [state]

  def one():
    holder[0], out = compiled(holder[0], {}, batch)
    jax.block_until_ready(out["loss"])

  fwd = jax.jit(lambda p, b: model.apply({"params": p}, b["z"], b["clip_img"], b["text"],
                                         jnp.full((s.batch,), 500.0), jnp.full((s.batch,), 500.0),
                                         b["data_type"]))
  fwd_c = fwd.lower(holder[0].params, batch).compile()
  fwd_flops_xla = _cost_flops(fwd_c)
  return dict(n_params=n_params, step=one, compile_s=compile_s, xla_flops=xla_flops,
              compiled=compiled, fwd=lambda: jax.block_until_ready(fwd_c(holder[0].params, batch)),
              fwd_xla_flops=fwd_flops_xla)


def _cost_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def _dump_hlo(compiled, hlo_dir: str) -> None:
  """Writes the optimised HLO and prints how often the ops that hint at waste appear."""
  import collections
  import re
  os.makedirs(hlo_dir, exist_ok=True)
  text = compiled.as_text()
  path = os.path.join(hlo_dir, "train_step.opt.hlo.txt")
  with open(path, "w") as f:
    f.write(text)
  ops = collections.Counter(re.findall(r"=\s*[a-z0-9\[\]{},]+\s+([a-z\-]+)\(", text))
  keep = ("dot", "convolution", "transpose", "copy", "fusion", "reduce", "custom-call", "bitcast")
  print(f"  HLO written to {path}; op census: " +
        ", ".join(f"{k}={ops[k]}" for k in keep if ops[k]))


# ---------------------------------------------------------------- reference (PyTorch + diffusers)

def torch_trainable(model) -> list:
  """The parameters torch's side trains: diffusers keeps an unused copy of the patch embedding
  (transformer.pos_embed.proj), left out of the optimiser and the parameter count."""
  params = []
  for n, p in model.named_parameters():
    if n.startswith("transformer.pos_embed."):
      p.requires_grad_(False)
    else:
      params.append(p)
  return params


def torch_update(params):
  """update(loss): backward, torch.optim.AdamW (foreach; the paper's settings, as build_ours)
  and the EMA (0.9999) of `params`."""
  import torch
  opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.9), weight_decay=0.03, foreach=True)
  ema = [p.detach().clone() for p in params]

  def update(loss):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - 0.9999)

  return update


def torch_side(s: Size) -> dict:
  """diffusers' train step and forward, as closures (`step`, `fwd`) plus the parameter count."""
  import torch

  from unidiffuser_jax.diffusion import schedule  # float64 numpy table only, no JAX

  torch.manual_seed(0)
  model = diffusers_uvit(s)
  params = torch_trainable(model)
  n_params = sum(p.numel() for p in params)
  update = torch_update(params)
  abar = torch.tensor(schedule.alphas_cumprod(), dtype=torch.float32)
  b = {k: torch.from_numpy(v) for k, v in make_batch(s).items()}
  z0 = b["z"].permute(0, 3, 1, 2).contiguous()  # NCHW
  gen = torch.Generator().manual_seed(1)

  def noise(x0, n):
    a = abar[n - 1].view(-1, *([1] * (x0.ndim - 1)))
    eps = torch.randn(x0.shape, generator=gen)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, eps

  def one():
    t_img = torch.randint(1, 1001, (s.batch,), generator=gen)
    t_text = torch.randint(1, 1001, (s.batch,), generator=gen)
    z_t, ez = noise(z0, t_img)
    c_t, ec = noise(b["clip_img"], t_img)
    y_t, ey = noise(b["text"], t_text)
    pz, pc, py = model(z_t, c_t, y_t, t_img, t_text, data_type=b["data_type"])
    se = torch.cat([(pz - ez).square().flatten(1), (pc - ec).square().flatten(1),
                    (py - ey).square().flatten(1)], dim=1)
    loss = se.mean()
    update(loss)
    return loss

  t500 = torch.full((s.batch,), 500)

  def fwd():
    with torch.inference_mode():
      model(z0, b["clip_img"], b["text"], t500, t500, data_type=b["data_type"])

  return dict(n_params=n_params, step=one, fwd=fwd)


# ---------------------------------------------------------------- report

def _cpu_name() -> str:
  """lscpu's model name and the widest SIMD extension the CPU reports (Linux /proc/cpuinfo)."""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    return "unknown CPU"
  name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
               if ln.startswith("model name")), "unknown CPU")
  flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines()
                    if ln.startswith("flags")), []))
  simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
  return f"{name} ({', '.join(simd) or 'no AVX2'})"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="full",
                      help="full: 44.8M params, batch 16; demo: configs/demo.py's U-ViT and batch; "
                           "quick: configs/demo.py:tiny's, MLP 4x (a sanity run)")
  parser.add_argument("--quick", action="store_true", help="same as --size=quick, fewer steps")
  parser.add_argument("--threads", type=int, default=0,
                      help="CPU threads for both sides (0: every core). 1 sets torch.set_num_threads(1) "
                           "and XLA_FLAGS+=--xla_cpu_multi_thread_eigen=false; pin the process "
                           "(taskset -c N) so both sides and the matmul peak share one core")
  parser.add_argument("--batch", type=int, default=0)
  parser.add_argument("--warmup", type=int, default=0)
  parser.add_argument("--steps", type=int, default=0)
  parser.add_argument("--block", type=int, default=1,
                      help="consecutive timed calls per side before the other side's turn (1: "
                           "strict alternation)")
  parser.add_argument("--peak_gflops", type=float, default=0.0,
                      help="skip measuring the matmul peak and use this value")
  parser.add_argument("--hlo_dir", default="", help="write our optimised HLO here")
  parser.add_argument("--compile_only", action="store_true",
                      help="only compile our step (with --hlo_dir: inspect the HLO), time nothing")
  args = parser.parse_args()
  quick = args.quick or args.size == "quick"
  size = SIZES["quick" if args.quick else args.size]()
  if args.batch:
    size = dataclasses.replace(size, batch=args.batch)
  warmup = args.warmup or (1 if quick else 3)
  steps = args.steps or (3 if quick else 10)
  if args.threads == 1:  # before jax is imported: XLA reads its flags once
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false").strip()

  import torch
  torch.set_num_threads(args.threads or os.cpu_count())
  import jax
  import matmul_peak  # benchmarks/ is this script's directory

  print(f"machine: {_cpu_name()}; {os.cpu_count()} cores, this process may run on "
        f"{len(os.sched_getaffinity(0))} ({sorted(os.sched_getaffinity(0))}), torch threads "
        f"{torch.get_num_threads()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; jax "
        f"{jax.__version__} on {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"torch {torch.__version__}")
  print(f"config ({'quick' if args.quick else args.size}): {dataclasses.asdict(size)} -> "
        f"{size.num_tokens} tokens ({size.num_patches} image + {size.num_text_tokens} text "
        f"+ 3 + 1), float32, v1")
  if args.compile_only:
    r = jax_side(size, args.hlo_dir or None, compile_only=True)
    print(f"params {r['n_params']:,}; compiled in {r['compile_s']:.1f} s; FLOPs/step analytic "
          f"{train_flops(size) / 1e9:.2f} G, XLA {(r['xla_flops'] or 0) / 1e9:.2f} G")
    return
  peak = args.peak_gflops or matmul_peak.measure([1024] if quick else [2048, 4096],
                                                 3 if quick else 10)["peak"]

  ours = jax_side(size, args.hlo_dir or None)
  ref = torch_side(size)
  step_t = _interleaved_times({"ours": ours["step"], "torch": ref["step"]}, warmup, steps,
                              args.block)
  fwd_t = _interleaved_times({"ours": ours["fwd"], "torch": ref["fwd"]}, warmup, steps, args.block)
  for name, r in (("ours", ours), ("torch", ref)):
    r.update(times=step_t[name], step_s=statistics.median(step_t[name]),
             step_min=min(step_t[name]), fwd_s=statistics.median(fwd_t[name]))
  ana = train_flops(size)
  fwd_ana = forward_flops(size)
  print(f"params: ours {ours['n_params']:,}, torch {ref['n_params']:,}")
  print(f"FLOPs/step: analytic {ana / 1e9:.2f} GFLOP (used below); XLA cost_analysis "
        + (f"{ours['xla_flops'] / 1e9:.2f} GFLOP" if ours["xla_flops"] else "n/a")
        + f"; forward analytic {fwd_ana / 1e9:.2f}, XLA "
        + (f"{ours['fwd_xla_flops'] / 1e9:.2f}" if ours["fwd_xla_flops"] else "n/a"))
  print(f"matmul peak (measured now): {peak:.1f} GFLOP/s; our compile time {ours['compile_s']:.1f} s")
  print(f"{'':16} | {'step ms':>9} | {'min ms':>8} | {'GFLOP/s':>8} | {'% peak':>6} | {'fwd ms':>8} | "
        f"{'fwd ex/s':>8} | {'fwd % peak':>10}")
  for name, r in (("ours (jax)", ours), ("torch+diffusers", ref)):
    g = ana / r["step_s"] / 1e9
    fg = fwd_ana / r["fwd_s"] / 1e9
    print(f"{name:16} | {r['step_s'] * 1e3:9.1f} | {r['step_min'] * 1e3:8.1f} | {g:8.1f} | "
          f"{100 * g / peak:5.1f}% | {r['fwd_s'] * 1e3:8.1f} | {size.batch / r['fwd_s']:8.1f} | "
          f"{100 * fg / peak:9.1f}%")
  print(f"ratio ours/torch (time): train step {ours['step_s'] / ref['step_s']:.2f} "
        f"(min {ours['step_min'] / ref['step_min']:.2f}), forward {ours['fwd_s'] / ref['fwd_s']:.2f}"
        f"  (< 1: ours is faster; torch/ours = {ref['step_s'] / ours['step_s']:.2f}x)")
  print("step times (s): ours " + " ".join(f"{t:.3f}" for t in ours["times"]) +
        " | torch " + " ".join(f"{t:.3f}" for t in ref["times"]))


if __name__ == "__main__":
  main()
