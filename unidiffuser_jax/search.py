"""`--mode=compile --config.compile.search=True`: which mesh, remat policy and per-chip batch.

Candidates: every (data, fsdp, tensor) mesh of the topology's devices with tensor in
compile.search_tensor (and dividing the heads and the MLP), x compile.search_remat, x gradient
accumulation in compile.search_accum (the global batch stays config.train.batch_size, so
accumulation lowers the per-chip micro-batch). Pruned before compiling: meshes whose float32
state (params + EMA + two AdamW moments, laid out by the rules: sharding.bytes_per_device)
alone exceeds HBM; and, per (mesh, remat), once a micro-batch does not fit, every larger one.
Each survivor is compiled by compile.py (a child process each) and its row is cached under
<workdir>/compile/search/<hash>.json, the hash of the config and the candidate, so a re-run is
instant. Ranked by estimated examples/s (ties: the candidate's name), printed with the command-
line overrides of the best.
"""
import dataclasses
import hashlib
import json
import os

import tqdm

from unidiffuser_jax import sharding, train


@dataclasses.dataclass(frozen=True)
class Point:
  data: int
  fsdp: int
  tensor: int
  remat: str
  accum: int

  @property
  def name(self) -> str:
    return (f"data={self.data},fsdp={self.fsdp},tensor={self.tensor},remat={self.remat},"
            f"accum={self.accum}")

  def overrides(self) -> list[str]:
    return [f"--config.mesh.data={self.data}", f"--config.mesh.fsdp={self.fsdp}",
            f"--config.mesh.tensor={self.tensor}", f"--config.model.remat={self.remat}",
            f"--config.train.grad_accum={self.accum}"]

  def apply(self, config):
    c = config.copy_and_resolve_references()
    c.mesh.update(data=self.data, fsdp=self.fsdp, tensor=self.tensor, num_devices=0)
    c.model.remat = self.remat
    c.train.grad_accum = self.accum
    return c


def meshes(n: int, model_cfg, tensors) -> list[tuple[int, int, int]]:
  """(data, fsdp, tensor) with data * fsdp * tensor = n, tensor dividing heads and MLP."""
  out = []
  for t in sorted(set(int(t) for t in tensors)):
    if n % t or model_cfg.num_heads % t or model_cfg.mlp_dim % t:
      continue
    rest = n // t
    out += [(d, rest // d, t) for d in range(1, rest + 1) if rest % d == 0]
  return out


def state_bytes(config, mesh_shape, n: int) -> int:
  """Per-device bytes of the train state on an abstract mesh of that shape (no compile)."""
  c = config.copy_and_resolve_references()
  c.mesh.update(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2], num_devices=0)
  mesh = sharding.abstract_mesh(c.mesh, n)
  built = train.build(c, mesh, abstract=True)
  return sharding.bytes_per_device(built.state, built.state_specs, mesh)


def candidates(config, n: int, hbm: float) -> tuple[list[Point], list[dict]]:
  """(points to compile, rows of points pruned without compiling), in a fixed order."""
  c = config.compile
  points, pruned = [], []
  batch = int(config.train.batch_size)
  for shape in meshes(n, config.model, c.search_tensor):
    if batch % (shape[0] * shape[1]):
      continue
    need = state_bytes(config, shape, n)
    for remat in c.search_remat:
      for accum in sorted(int(a) for a in c.search_accum):
        p = Point(*shape, remat, accum)
        if (batch // (shape[0] * shape[1])) % accum:
          continue
        if need > hbm:
          pruned.append(dict(candidate=p.name, status="does not fit",
                             error=f"state alone {need / 2**30:.2f} GiB > HBM"))
        else:
          points.append(p)
  return points, pruned


def _key(config, topology: str, p: Point) -> str:
  text = json.dumps([p.apply(config).to_dict(), topology, p.name], sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def rank(rows: list[dict]) -> list[dict]:
  """Fitting rows by estimated examples/s (descending), then by the no-overlap MFU (compute-bound
  rows share the overlapped bound, so that is what tells them apart), then by name;
  deterministic."""
  ok = [r for r in rows if r.get("status") == "ok"]
  return sorted(ok, key=lambda r: (-r["examples_per_s"], -(r.get("mfu_serial") or 0.0),
                                   r["candidate"]))


def run(config, workdir: str, devices, hbm: float, compile_one) -> list[dict]:
  """compile_one(config, out_dir) -> row (compile.py: the train step in a child process)."""
  topology = str(config.compile.topology)
  out_dir = os.path.join(workdir, "compile", "search")
  os.makedirs(out_dir, exist_ok=True)
  points, pruned = candidates(config, len(devices), hbm)
  rows = list(pruned)
  skip = set()   # (mesh, remat) whose smaller micro-batch already did not fit
  # Larger accumulation = smaller micro-batch: walk each (mesh, remat) from the smallest up.
  for p in tqdm.tqdm(sorted(points, key=lambda p: (p.data, p.fsdp, p.tensor, p.remat, -p.accum)),
                     desc="search", unit="compile"):
    group = (p.data, p.fsdp, p.tensor, p.remat)
    if group in skip:
      rows.append(dict(candidate=p.name, status="does not fit",
                       error="a smaller micro-batch of this mesh and remat did not fit"))
      continue
    path = os.path.join(out_dir, _key(config, topology, p) + ".json")
    if os.path.exists(path):
      with open(path) as f:
        row = json.load(f)
    else:
      row = compile_one(p.apply(config), out_dir)
      with open(path, "w") as f:
        json.dump(row, f, default=str)
    row = dict(row, candidate=p.name, overrides=p.overrides())
    if row.get("status") == "does not fit":
      skip.add(group)
    rows.append(row)
  return rows


def format_table(rows: list[dict]) -> str:
  ranked = rank(rows)
  lines = [f"{'rank':>4}  {'candidate':<52} {'peak GiB':>9} {'step ms':>9} {'ex/s':>10} {'MFU':>6}"
           f" {'no-overlap MFU':>15}"]
  for i, r in enumerate(ranked, 1):
    serial = r.get("mfu_serial")
    lines.append(f"{i:>4}  {r['candidate']:<52} {r['memory']['peak'] / 2**30:>9.3f} "
                 f"{r['step_seconds'] * 1e3:>9.4g} {r['examples_per_s']:>10.4g} "
                 f"{100 * (r['mfu'] or 0):>5.1f}% "
                 + (f"{100 * serial:>14.1f}%" if serial is not None else f"{'-':>15}"))
  for r in rows:
    if r.get("status") != "ok":
      lines.append(f"   -  {r['candidate']:<52} {r['status']}: {r.get('error', '')}")
  if ranked:
    lines.append("best: add " + " ".join(ranked[0]["overrides"]) + " to the train command "
                 f"(step time from {ranked[0]['step_seconds_source']})")
  else:
    lines.append("no candidate fits")
  return "\n".join(lines)
