"""How fast a step should be: analytic FLOPs, chip peaks, the measured CPU peak, a roofline.

One place for the facts every performance number uses: --mode=compile's estimates
(compile.py), the trainer's TFLOP/s and MFU telemetry (metrics.py) and the benchmarks.

  uvit_forward_flops(model, batch)  multiply-adds x 2 of every matmul and attention product of
                                    one U-ViT forward (the convention of model-FLOPs utilisation:
                                    no element-wise ops, no remat recomputation)
  uvit_train_flops(model, batch)    3x that (backward: activation and weight gradients)
  CHIPS / chip_for(device)          per device kind: peak bf16 FLOP/s, HBM GiB, HBM and ICI
                                    bytes/s (public spec sheets; per chip)
  matmul_peak_flops()               the local machine's float32 matmul FLOP/s, measured once
  roofline_seconds(...)             max(FLOPs / peak, HBM bytes / bandwidth, ICI bytes / bandwidth),
                                    and their sum (nothing overlapping)
"""
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp


def uvit_forward_flops(m, batch: int) -> int:
  """FLOPs (2 per multiply-add) of one forward of U-ViT `m` (a uvit.UViT, or anything with
  its size fields) on `batch` examples: qkv, projection, MLP, attention products, the
  out-blocks' skip linears, the embeddings and the output heads."""
  t, d, f = m.num_tokens, m.width, m.mlp_dim
  pp = m.patch_size ** 2 * m.latent_channels
  block = 2 * t * d * 3 * d + 2 * t * d * d + 2 * 2 * t * d * f  # qkv, proj, fc1 + fc2
  block += 2 * 2 * t * t * d                                     # q k^T and p v
  skip = 2 * t * 2 * d * d                                        # out-blocks' skip_linear
  embed = 2 * m.num_patches * pp * d + 2 * m.num_text_tokens * m.text_dim * d + 2 * m.clip_img_dim * d
  head = 2 * m.num_patches * d * pp + 2 * m.num_text_tokens * d * m.text_dim + 2 * d * m.clip_img_dim
  n_blocks = 2 * (m.depth // 2) + 1  # in-blocks, mid-block, out-blocks (depth 6 -> 7 blocks)
  return batch * (n_blocks * block + (m.depth // 2) * skip + embed + head)


def uvit_train_flops(m, batch: int) -> int:
  """Model FLOPs of one optimizer step on `batch` examples (forward + backward = 3x forward)."""
  return 3 * uvit_forward_flops(m, batch)


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_flops: float       # dense bf16 FLOP/s per chip
  hbm_gib: float          # HBM per chip
  hbm_bytes_s: float      # HBM bandwidth per chip
  ici_bytes_s: float      # inter-chip bandwidth per chip (all links); NVLink for GPUs
  cores_per_chip: int = 1  # TensorCores one chip exposes as one device (megacore)


# Public spec-sheet values per chip (Cloud TPU system-architecture pages; NVIDIA data sheets).
# Keys are substrings of jax's device_kind, most specific first.
CHIPS = (
    ("TPU v6 lite", Chip("v6e", 918e12, 32, 1640e9, 448e9)),
    ("TPU v5 lite", Chip("v5e", 197e12, 16, 819e9, 200e9)),
    ("TPU v5p", Chip("v5p", 459e12, 95, 2765e9, 600e9, 2)),
    ("TPU v5", Chip("v5p", 459e12, 95, 2765e9, 600e9, 2)),
    ("TPU v4", Chip("v4", 275e12, 32, 1228e9, 300e9, 2)),
    ("H200", Chip("H200", 989e12, 141, 4800e9, 900e9)),
    ("H100", Chip("H100", 989e12, 80, 3350e9, 900e9)),
    ("A100", Chip("A100", 312e12, 80, 2039e9, 600e9)),
)


def chip_for(device) -> Chip | None:
  """The spec of `device`'s chip kind, scaled to one device: libtpu's compile-only v4
  devices are single TensorCores (num_cores=1, half a chip). None for unknown kinds (CPU)."""
  for key, chip in CHIPS:
    if key in device.device_kind:
      cores = getattr(device, "num_cores", chip.cores_per_chip) or chip.cores_per_chip
      share = cores / chip.cores_per_chip
      if share >= 1:
        return chip
      return dataclasses.replace(chip, peak_flops=chip.peak_flops * share,
                                 hbm_gib=chip.hbm_gib * share,
                                 hbm_bytes_s=chip.hbm_bytes_s * share,
                                 ici_bytes_s=chip.ici_bytes_s * share)
  return None


@functools.cache
def matmul_peak_flops(n: int = 1024, reps: int = 5) -> float:
  """FLOP/s of a float32 n x n matmul on the default device, best of `reps` (measured once per
  process; on CPU every device of the process shares these cores)."""
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST))
  mm(a, b).block_until_ready()  # compile + warm caches
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    mm(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def device_peak_flops(device, num_local_devices: int = 1) -> tuple[float, str]:
  """(peak FLOP/s of one device, where it comes from): the chip table, or for CPU the measured
  matmul peak shared by the process's `num_local_devices` devices."""
  chip = chip_for(device)
  if chip is not None:
    return chip.peak_flops, f"{chip.name} spec bf16"
  return matmul_peak_flops() / max(1, num_local_devices), "measured f32 matmul"


def roofline_seconds(flops: float, hbm_bytes: float, ici_bytes: float, chip: Chip) -> dict:
  """Per-device times of one step at the chip's peaks: compute, HBM traffic, ICI traffic;
  `seconds` their maximum (everything overlapping perfectly: a lower bound of the step, at
  these counts) and its `bound`, `serial_s` their sum (nothing overlapping)."""
  parts = {"compute_s": flops / chip.peak_flops, "hbm_s": hbm_bytes / chip.hbm_bytes_s,
           "ici_s": ici_bytes / chip.ici_bytes_s}
  bound = max(parts, key=parts.get)
  return {**parts, "seconds": parts[bound], "bound": bound[:-2], "serial_s": sum(parts.values())}
