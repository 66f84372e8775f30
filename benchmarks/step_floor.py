"""The floor under our train step on this CPU: its matmuls alone, its optimizer alone, vs the targets.

  python benchmarks/step_floor.py                  # the 44.8M U-ViT, batch 16 (bench_train's full size)
  python benchmarks/step_floor.py --size=demo      # configs/demo.py's U-ViT and batch
  python benchmarks/step_floor.py --quick          # configs/demo.py:tiny: a sanity run

bench_train.py times whole steps; this script asks what the step could cost at best with the
kernels XLA:CPU has. It compiles our train step exactly as bench_train does (train.build_task),
reads every dot of the optimised HLO (operand shapes and dimension numbers, inside fusions or
not), and times each distinct dot alone, jitted by itself (best of --reps after a warm-up), and
the same contraction in torch (torch.einsum), each less the time of one call of a 1 x 1 dot
(dispatch, which a compiled step does not pay per dot). The sum over the step's dots is the time XLA's
kernels need for the matmuls with nothing else in the way. The rest of a step is timed as the
trainer's step on a model whose loss is 1/2 |params|^2 over the same parameters (AdamW, EMA,
non-finite guard, gradient norm: train.build_task's step, with a gradient that costs one pass),
beside torch's AdamW(foreach) + EMA lerp on the same shapes. Both sides' whole steps (bench_train's
closures, turns of --block steps) and the matmul peak (matmul_peak.py) are measured in the same run.

The report ends with each of issue 11's speed targets as a step-time budget next to the floor:
   * >= 80% of the matmul peak: step <= analytic FLOPs / (0.8 x peak);
   * never slower than torch: step <= torch's step;
   * at the demo's size, >= 2x torch: step <= torch's step / 2.
A budget below the floor cannot be met with these kernels, whatever the rest of the step does.
"""
import argparse
import collections
import os
import re
import statistics
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(__file__))

import bench_train  # noqa: E402  (benchmarks/: this script's directory)
import matmul_peak  # noqa: E402

_DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64"}
_SHAPE = re.compile(r"%([\w.\-]+) = (\w+)\[([\d,]*)\]")
_DOT = re.compile(r"%([\w.\-]+) = (\w+)\[[\d,]*\]\S* dot\(([^)]*)\)(.*)$")


def _dims(attrs: str, name: str) -> tuple[int, ...]:
  m = re.search(name + r"=\{([\d,]*)\}", attrs)
  return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


def hlo_dots(hlo_text: str) -> collections.Counter:
  """{(dtype, lhs shape, rhs shape, (lhs_contract, rhs_contract), (lhs_batch, rhs_batch)): count}
  for every dot instruction of an HLO module's text."""
  shapes = {name: (dt, tuple(int(d) for d in dims.split(",") if d))
            for name, dt, dims in _SHAPE.findall(hlo_text)}
  dots = collections.Counter()
  for line in hlo_text.splitlines():
    m = _DOT.search(line.strip())
    if not m:
      continue
    operands = re.findall(r"%([\w.\-]+)", m.group(3))
    if len(operands) != 2:
      raise ValueError(f"a dot with {len(operands)} operands: {line.strip()[:200]}")
    (dt, lhs), (_, rhs) = shapes[operands[0]], shapes[operands[1]]
    attrs = m.group(4)
    contract = (_dims(attrs, "lhs_contracting_dims"), _dims(attrs, "rhs_contracting_dims"))
    batch = (_dims(attrs, "lhs_batch_dims"), _dims(attrs, "rhs_batch_dims"))
    dots[(dt, lhs, rhs, contract, batch)] += 1
  return dots


def dot_flops(dot) -> int:
  _, lhs, rhs, (lc, rc), (lb, rb) = dot
  free_l = [d for i, d in enumerate(lhs) if i not in lc and i not in lb]
  free_r = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
  k = 1
  for i in lc:
    k *= lhs[i]
  n = 1
  for d in [lhs[i] for i in lb] + free_l + free_r:
    n *= d
  return 2 * n * k


def einsum_spec(dot) -> str:
  """The dot as an einsum string, output in XLA's order: batch, lhs free, rhs free."""
  _, lhs, rhs, (lc, rc), (lb, rb) = dot
  letters = iter("abcdefghijklmnopqrstuvwxyz")
  l_sub = [None] * len(lhs)
  r_sub = [None] * len(rhs)
  for i, j in zip(lb + lc, rb + rc):
    l_sub[i] = r_sub[j] = next(letters)
  l_sub = [c or next(letters) for c in l_sub]
  r_sub = [c or next(letters) for c in r_sub]
  out = ([l_sub[i] for i in lb] + [c for i, c in enumerate(l_sub) if i not in lb and i not in lc]
         + [c for i, c in enumerate(r_sub) if i not in rb and i not in rc])
  return f"{''.join(l_sub)},{''.join(r_sub)}->{''.join(out)}"


def _best(fn, reps: int) -> float:
  fn()   # compile / warm up
  return matmul_peak._best_seconds(fn, reps)


def time_dot_alone(dot, reps: int) -> tuple[float, float]:
  """(seconds in XLA, seconds in torch) for one dot on random operands, best of `reps`,
  including each library's cost of one call (call_overhead)."""
  import jax
  import numpy as np
  import torch
  dt, lhs, rhs, contract, batch = dot
  rng = np.random.default_rng(0)
  a = rng.standard_normal(lhs).astype(_DTYPES[dt])
  b = rng.standard_normal(rhs).astype(_DTYPES[dt])
  f = jax.jit(lambda x, y: jax.lax.dot_general(x, y, (contract, batch)))
  ja, jb = jax.device_put(a), jax.device_put(b)
  spec = einsum_spec(dot)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  # The same contraction on both sides, or the torch column means nothing.
  k = int(np.prod([lhs[i] for i in contract[0]]))   # each output sums k products: std sqrt(k)
  np.testing.assert_allclose(torch.einsum(spec, ta, tb).numpy(), np.asarray(f(ja, jb)),
                             rtol=1e-3, atol=1e-4 * np.sqrt(k))
  t_xla = _best(lambda: f(ja, jb).block_until_ready(), reps)
  t_torch = _best(lambda: torch.einsum(spec, ta, tb), reps)
  return t_xla, t_torch


def call_overhead(reps: int) -> tuple[float, float]:
  """(XLA, torch) seconds of one call of a 1 x 1 dot: dispatch, not arithmetic. A step runs its
  dots inside one program, so the floor subtracts this from each dot timed alone."""
  dot = ("f32", (1, 1), (1, 1), ((1,), (0,)), ((), ()))
  return time_dot_alone(dot, 20 * reps)


def ours_rest(s) -> Callable[[], None]:
  """The trainer's step (bench_train.build_ours: train.build_task, the same optimiser) on a
  model whose loss is 1/2 |params|^2 over our U-ViT's parameters: everything of a step but the
  network."""
  import jax
  import jax.numpy as jnp

  def loss(params, frozen, batch, key):
    del frozen, batch, key
    return 0.5 * sum(jnp.vdot(p, p) for p in jax.tree.leaves(params)), {}

  built = bench_train.build_ours(bench_train.our_uvit(s), loss)
  holder = [built.state]
  compiled = built.lower({}).compile()

  def one():
    holder[0], out = compiled(holder[0], {}, {})
    jax.block_until_ready(out["loss"])

  return one


def torch_rest(s) -> Callable[[], None]:
  """torch's AdamW(foreach) + EMA (bench_train.torch_update) on diffusers' U-ViT's parameters,
  with the same 1/2 |params|^2 loss."""
  params = bench_train.torch_trainable(bench_train.diffusers_uvit(s))
  update = bench_train.torch_update(params)
  return lambda: update(0.5 * sum((p * p).sum() for p in params))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=sorted(bench_train.SIZES), default="full")
  parser.add_argument("--quick", action="store_true", help="same as --size=quick, fewer repetitions")
  parser.add_argument("--reps", type=int, default=0, help="timed repetitions of each dot (best of)")
  parser.add_argument("--warmup", type=int, default=0)
  parser.add_argument("--steps", type=int, default=0, help="timed whole steps per side")
  parser.add_argument("--block", type=int, default=4, help="as bench_train's --block")
  parser.add_argument("--peak_gflops", type=float, default=0.0,
                      help="skip measuring the matmul peak and use this value")
  args = parser.parse_args()
  size_name = "quick" if args.quick else args.size
  quick = size_name == "quick"
  s = bench_train.SIZES[size_name]()
  reps = args.reps or (2 if quick else 7)
  warmup = args.warmup or (1 if quick else 3)
  steps = args.steps or (2 if quick else 8)

  import jax
  import torch
  torch.set_num_threads(os.cpu_count())
  print(f"machine: {bench_train._cpu_name()}; {os.cpu_count()} cores; XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r};"
        f" jax {jax.__version__}, torch {torch.__version__}; size {size_name}, batch {s.batch}")
  peak = args.peak_gflops or matmul_peak.measure([1024] if quick else [2048, 4096],
                                                 3 if quick else 10)["peak"]

  ours = bench_train.jax_side(s, None)
  ref = bench_train.torch_side(s)
  dots = hlo_dots(ours["compiled"].as_text())
  if not dots:
    raise SystemExit("no dot in the compiled step's HLO: the parser no longer reads XLA's text")
  over_xla, over_torch = call_overhead(reps)
  rows = []
  for dot, count in sorted(dots.items(), key=lambda kv: -dot_flops(kv[0]) * kv[1]):
    t_xla, t_torch = time_dot_alone(dot, reps)
    rows.append((dot, count, max(t_xla - over_xla, 1e-7), max(t_torch - over_torch, 1e-7)))
  rest = {"ours": ours_rest(s), "torch": torch_rest(s)}
  rest_t = bench_train._interleaved_times(rest, warmup, steps, args.block)
  step_t = bench_train._interleaved_times({"ours": ours["step"], "torch": ref["step"]}, warmup,
                                          steps, args.block)

  n_dots = sum(c for _, c, _, _ in rows)
  dot_gflop = sum(dot_flops(d) * c for d, c, _, _ in rows) / 1e9
  xla_dots = sum(t * c for _, c, t, _ in rows)
  torch_dots = sum(t * c for _, c, _, t in rows)
  print(f"matmul peak (measured now): {peak:.1f} GFLOP/s; analytic step "
        f"{bench_train.train_flops(s) / 1e9:.4g} GFLOP; the step's {n_dots} dots "
        f"({len(rows)} distinct): {dot_gflop:.4g} GFLOP")
  print(f"{'dot (lhs x rhs, contract, batch)':58} | {'n':>3} | {'XLA ms':>7} | {'GFLOP/s':>7} | "
        f"{'torch ms':>8} | {'GFLOP/s':>7}")
  for dot, count, t_xla, t_torch in rows:
    _, lhs, rhs, contract, batch = dot
    desc = f"{list(lhs)} x {list(rhs)} c{contract[0]}{contract[1]} b{batch[0]}{batch[1]}"
    g = dot_flops(dot) / 1e9
    print(f"{desc:58} | {count:3d} | {t_xla * 1e3:7.2f} | {g / t_xla:7.1f} | {t_torch * 1e3:8.2f} | "
          f"{g / t_torch:7.1f}")
  med = {k: statistics.median(v) for k, v in step_t.items()}
  rest_med = {k: statistics.median(v) for k, v in rest_t.items()}
  print(f"(each dot's time less one call of a 1 x 1 dot: XLA {over_xla * 1e6:.0f} us, torch "
        f"{over_torch * 1e6:.0f} us)")
  print(f"the step's dots alone: XLA {xla_dots * 1e3:.1f} ms ({dot_gflop / xla_dots:.1f} GFLOP/s), "
        f"torch's kernels {torch_dots * 1e3:.1f} ms ({dot_gflop / torch_dots:.1f} GFLOP/s)")
  print(f"the rest alone (optimizer, EMA, guard on a 1/2 |params|^2 loss): ours "
        f"{rest_med['ours'] * 1e3:.1f} ms, torch {rest_med['torch'] * 1e3:.1f} ms (median of {steps})")
  print(f"whole step (median of {steps}): ours {med['ours'] * 1e3:.1f} ms, torch "
        f"{med['torch'] * 1e3:.1f} ms (ours/torch {med['ours'] / med['torch']:.2f})")
  floor = xla_dots + rest_med["ours"]
  print(f"floor with XLA:CPU's kernels (dots alone + rest alone): {floor * 1e3:.1f} ms; ours "
        f"is {med['ours'] / floor:.2f}x its floor; torch's kernels' floor "
        f"{(torch_dots + rest_med['torch']) * 1e3:.1f} ms")
  budgets = [(">= 80% of the matmul peak (issue 11, 44.8M size)",
              bench_train.train_flops(s) / (0.8 * peak * 1e9)),
             ("never slower than torch (issue 11, 44.8M size)", med["torch"]),
             (">= 2x torch (issue 11, demo size)", med["torch"] / 2)]
  for name, budget in budgets:
    verdict = ("within reach" if budget >= floor else
               "below the floor: not reachable with XLA:CPU's kernels")
    print(f"target {name}: step <= {budget * 1e3:.1f} ms: {verdict}")


if __name__ == "__main__":
  main()
