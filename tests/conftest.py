"""Test setup: eight fake CPU devices so that every test shards for real.

XLA reads XLA_FLAGS once, when the backend starts, so this must run before
anything imports jax's backend; conftest.py is imported by pytest first.
"""
import os

# The test models are tiny, so XLA's compile time dominates the suite; its cheapest
# backend optimisation level halves it, and the tests check numbers, not speed.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 " + FAST_COMPILE
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Test-only references (pytorch-fid, torchmetrics) import torchvision; see torchvision_compat.
from tests.torchvision_compat import import_torchvision  # noqa: E402

import_torchvision()
