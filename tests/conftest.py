"""Test-wide setup: 8 fake CPU devices (set before jax is imported anywhere) and the repo
root on sys.path so `configs` imports."""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# libtpu (the `tpu` extra, for AOT compiles) must not grab the default backend in tests.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
