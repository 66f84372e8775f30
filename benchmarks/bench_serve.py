"""--mode=serve under load: batched serving vs one request at a time, over HTTP on 127.0.0.1.

  python benchmarks/bench_serve.py             # configs/demo.py's model (random U-ViT weights),
                                               # 20 steps, 64 t2i requests from 16 clients
  python benchmarks/bench_serve.py --quick     # configs/demo.py:tiny, 3 steps, 16 from 4

Makes a workdir with the demo's word-level tokenizer and a randomly initialised U-ViT
checkpoint (speed does not depend on the weights; the captions and images are noise), then
starts `python -m unidiffuser_jax.main --mode=serve` as a separate process, twice:
  batched    config.serve.batch_size=--batch (16), max_wait_ms=--wait (100): the N requests
             from C concurrent clients (N/C requests each, in turn),
             then the same N requests one at a time on the same server (each image must be
             byte-identical to its concurrent twin: seeds do not depend on batch-mates);
  one by one batch_size=1, max_wait_ms=0: the same N requests one at a time (the baseline:
             what a server without batching does with this model).
The clients are plain HTTP (httpx, gradio's /gradio_api/call API), one thread each.
Timed: each request from submit to its PNG downloaded; images/s =
N / wall time of the phase; p50/p95 of the per-request latencies; how many requests shared
each request's batch. Start-up (compiling, then one request) is excluded and printed.
Requests: "a red circle on the left" ... (the demo's captions), seed i for request i, 1 image
each, guidance 7.
"""
import argparse
import collections
import concurrent.futures
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import flax.linen as nn
import httpx
import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import demo  # noqa: E402
from data_pipelines import demo_data  # noqa: E402
from unidiffuser_jax import vocab  # noqa: E402
from unidiffuser_jax.models import uvit  # noqa: E402

PROMPTS = ("a red circle on the left", "a blue square at the top",
           "a green triangle on the right", "a yellow circle at the bottom")


def make_workdir(root: str, arg: str) -> dict:
  config = demo.get_config(arg)
  tok = demo_data.build_tokenizer(os.path.join(root, "tokenizer"))
  config.data.tokenizer = tok
  vocab.derive(config)
  model = uvit.from_config(config.model)
  params = nn.unbox(model.init(jax.random.key(0), *uvit.dummy_inputs(model))["params"])
  n = sum(x.size for x in jax.tree.leaves(params))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(root, "uvit"), {"ema_params": jax.device_get(params)})
  return dict(tokenizer=tok, checkpoint=os.path.join(root, "uvit"), params=n)


def start_server(root, arg, paths, port, steps, batch, wait_ms):
  cmd = [sys.executable, "-m", "unidiffuser_jax.main", "--mode=serve",
         f"--config=configs/demo.py{':' + arg if arg else ''}", f"--workdir={root}",
         f"--config.data.tokenizer={paths['tokenizer']}",
         f"--config.sample.checkpoint={paths['checkpoint']}",
         "--config.encoders.fit_latent_stats=0", "--config.serve.tasks=('t2i',)",
         f"--config.serve.steps=({steps},)", f"--config.serve.batch_size={batch}",
         "--config.serve.max_samples=1", f"--config.serve.max_wait_ms={wait_ms}",
         f"--config.serve.port={port}", f"--config.serve.output_dir={root}/out{batch}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  log = open(os.path.join(root, f"serve{batch}.log"), "w")
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  url = f"http://127.0.0.1:{port}/"
  while time.perf_counter() - t0 < 900:
    if proc.poll() is not None:
      raise SystemExit(f"the server exited; see {log.name}")
    try:
      if httpx.get(url, timeout=2).status_code == 200:   # the page is up; the programs compile
        request(_client(url), 0, steps)                  # ... and this waits for them
        return proc, url, time.perf_counter() - t0
    except httpx.HTTPError:
      pass
    time.sleep(0.5)
  proc.kill()
  raise SystemExit("the server did not start in 15 minutes")


def request(client, i, steps):
  """One t2i request as any HTTP client makes it (gradio's /call API: submit, read the event
  stream, download the PNG) -> (seconds, pixels, requests in its batch)."""
  t0 = time.perf_counter()
  r = client.post("gradio_api/call/t2i",
                  json={"data": [PROMPTS[i % len(PROMPTS)], i, False, steps, 7.0, 1]})
  r.raise_for_status()
  events = client.get(f"gradio_api/call/t2i/{r.json()['event_id']}").text
  if "event: complete" not in events:
    raise RuntimeError(f"request {i} failed: {events[-300:]}")
  gallery, info = json.loads(events.split("event: complete\ndata:", 1)[1].split("\n", 1)[0])
  png = client.get(gallery[0]["image"]["url"]).content
  dt = time.perf_counter() - t0
  shared = int(re.search(r"in a batch of (\d+) request", info).group(1))
  return dt, np.asarray(Image.open(io.BytesIO(png))).tobytes(), shared


def run_phase(url, n, clients, steps):
  """n requests from `clients` concurrent clients -> (wall s, latencies, images by index)."""
  cs = [_client(url) for _ in range(clients)]
  per = [list(range(c, n, clients)) for c in range(clients)]
  out = {}

  def client_loop(c):
    for i in per[c]:
      out[i] = request(cs[c], i, steps)

  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    for f in [pool.submit(client_loop, c) for c in range(clients)]:
      f.result(timeout=1800)
  wall = time.perf_counter() - t0
  sizes = collections.Counter(out[i][2] for i in range(n))
  print(f"  requests by the number of requests in their batch: {dict(sorted(sizes.items()))}",
        flush=True)
  return wall, np.array([out[i][0] for i in range(n)]), {i: out[i][1] for i in range(n)}


def stats(name, n, wall, lat):
  p50, p95 = np.percentile(lat, [50, 95])
  print(f"{name:34s} {n / wall:7.2f} images/s  wall {wall:7.2f} s  p50 {p50 * 1e3:7.0f} ms  "
        f"p95 {p95 * 1e3:7.0f} ms", flush=True)
  return n / wall


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--requests", type=int, default=64)
  ap.add_argument("--clients", type=int, default=16)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--wait", type=int, default=100, help="config.serve.max_wait_ms")
  a = ap.parse_args()
  arg = "tiny" if a.quick else ""
  if a.quick:
    a.requests, a.clients, a.steps, a.batch = 16, 4, 3, 4
  root = tempfile.mkdtemp(prefix="bench_serve_")
  paths = make_workdir(root, arg)
  print(f"configs/demo.py{':' + arg if arg else ''}: U-ViT {paths['params']:,} params (random), "
        f"{a.steps} steps, {a.requests} t2i requests; load average {os.getloadavg()}", flush=True)
  port = _free_port()
  proc, url, startup = start_server(root, arg, paths, port, a.steps, a.batch, a.wait)
  try:
    print(f"batched server (batch {a.batch}, wait {a.wait} ms) up in {startup:.0f} s", flush=True)
    wall, lat, imgs = run_phase(url, a.requests, a.clients, a.steps)
    batched = stats(f"batched, {a.clients} clients", a.requests, wall, lat)
    wall1, lat1, imgs1 = run_phase(url, a.requests, 1, a.steps)
    stats("same server, one at a time", a.requests, wall1, lat1)
    same = sum(imgs[i] == imgs1[i] for i in imgs)
    print(f"seed-deterministic: {same}/{a.requests} images byte-identical alone vs in a batch; "
          f"{len(set(imgs.values()))} distinct images", flush=True)
    if same != a.requests:
      raise SystemExit("FAILED: a seed's image depends on its batch")
  finally:
    proc.terminate()
    proc.wait(30)
  proc, url, startup = start_server(root, arg, paths, _free_port(), a.steps, 1, 0)
  try:
    print(f"one-by-one server (batch 1) up in {startup:.0f} s", flush=True)
    wall2, lat2, _ = run_phase(url, a.requests, 1, a.steps)
    single = stats("batch-1 server, one at a time", a.requests, wall2, lat2)
  finally:
    proc.terminate()
    proc.wait(30)
  print(f"speed-up: {batched / single:.2f}x images/s (batched, {a.clients} clients vs batch-1 "
        f"server one at a time); load average after {os.getloadavg()}", flush=True)


def _client(url):
  return httpx.Client(base_url=url, timeout=600)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


if __name__ == "__main__":
  main()
