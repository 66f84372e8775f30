"""sample.generate over 2 real processes (jax.distributed on 127.0.0.1, 4 CPU devices each)
gives every process the same records as 1 process with 8 devices: inputs split over the global
mesh, each process reading only its rows' images, outputs gathered to every process; and so
--mode=eval's CLIP scores (t2i and i2t, a tiny random CLIP) over 2 processes equal 1 process's."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.multiprocess_sampling import run_tasks, tiny_config
from tests.test_evaluate import tiny_clip

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]   # two processes compile two samplers

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKER = r"""
import json, sys
import jax
jax.distributed.initialize("127.0.0.1:%(port)d", num_processes=2, process_id=int(sys.argv[1]),
                           initialization_timeout=120)
sys.path.insert(0, %(root)r)
import numpy as np
from tests import multiprocess_sampling as t
assert jax.process_count() == 2 and len(jax.devices()) == 8
got = t.run_tasks(t.tiny_config(*sys.argv[2].split(",")), *sys.argv[3].split(","),
                  sys.argv[4] + "_workdir")
np.save(sys.argv[4] + ".npy", got.pop("pixels"))
json.dump(got, open(sys.argv[4] + ".json", "w"))
"""


def test_two_processes_generate_as_one(tiny_sampler, tmp_path):
  fixture = tiny_sampler[0]
  config = tiny_config(fixture.data.tokenizer, fixture.sample.checkpoint)
  images = tmp_path / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(images / f"{i}.png")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  clip_dir = tiny_clip(config, tmp_path / "clip")
  script = tmp_path / "worker.py"
  script.write_text(_WORKER % dict(port=port, root=_ROOT))
  flags = os.environ.get("XLA_FLAGS", "").replace("device_count=8", "device_count=4")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4", "XLA_FLAGS": flags}
  procs = [subprocess.Popen([sys.executable, str(script), str(i), f"{config.data.tokenizer},{config.sample.checkpoint}",
                             f"{images},{clip_dir}", str(tmp_path / f"out{i}")],
                            cwd=_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  one = run_tasks(config, str(images), clip_dir, str(tmp_path / "one"))   # 1 process, 8 devices
  assert one["t2i_index"] == list(range(10)) and len(one["captions"]) == 3
  for i in range(2):
    pixels = np.load(tmp_path / f"out{i}.npy")
    got = json.loads((tmp_path / f"out{i}.json").read_text())
    assert got["t2i_index"] == one["t2i_index"] and got["i2t_images"] == one["i2t_images"]
    np.testing.assert_array_equal(pixels, one["pixels"])
    assert got["captions"] == one["captions"]
    assert set(got["clip_scores"]) == {"t2i", "i2t"}
    for task, value in one["clip_scores"].items():
      assert abs(got["clip_scores"][task] - value) <= 1e-6 * abs(value), (task, got, one)
