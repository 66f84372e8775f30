"""Test setup: eight fake CPU devices so that every test shards for real.

XLA reads XLA_FLAGS once, when the backend starts, so this must run before
anything imports jax's backend; conftest.py is imported by pytest first.
"""
import atexit
import os
import shutil
import tempfile

# The test models are tiny, so XLA's compile time dominates the suite; its cheapest
# backend optimisation level halves it, and the tests check numbers, not speed.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 " + FAST_COMPILE
).strip()
# One persistent compilation cache per test process (per pytest-xdist worker; never shared
# between workers): many tests compile the same programs (the tiny config's train step, its
# samplers), and a cached one loads in a fraction of its compile time. Jobs use it too
# (compile.cache_dir "" defers to this variable), and subprocesses inherit it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix=f"unidiffuser-test-cache-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Test-only references (pytorch-fid, torchmetrics) import torchvision; see torchvision_compat.
from tests.torchvision_compat import import_torchvision  # noqa: E402

import_torchvision()


import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402

from configs import demo  # noqa: E402
from data_pipelines import demo_data  # noqa: E402
from unidiffuser_jax import vocab  # noqa: E402
from unidiffuser_jax.models import uvit  # noqa: E402


@pytest.fixture(scope="module")
def tiny_sampler(tmp_path_factory):
  """A tiny config with a word-level tokenizer and a random U-ViT saved as a checkpoint
  (config.sample.checkpoint), 3-step sampling: (config, model, params, root)."""
  root = tmp_path_factory.mktemp("sample")
  config = vocab.derive(demo.get_config("tiny"))
  config.data.tokenizer = demo_data.build_tokenizer(str(root / "tokenizer"))
  vocab.derive(config)
  config.sample.update(steps=3, order=2, guidance_scale=3.0, max_caption_tokens=5, num_beams=2,
                       prompts=("a red circle on the left", "a blue square at the top",
                                "a green triangle on the right"))
  model = uvit.from_config(config.model)
  params = nn.unbox(model.init(jax.random.key(0), *uvit.dummy_inputs(model))["params"])
  ckpt = root / "uvit"
  with ocp.StandardCheckpointer() as ckptr:   # leaving the block waits for the async save
    ckptr.save(ckpt, {"ema_params": jax.device_get(params)})
  config.sample.checkpoint = str(ckpt)
  return config, model, params, root
