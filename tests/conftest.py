"""Test-wide setup: 8 fake CPU devices (set before jax is imported anywhere) and the repo
root on sys.path so `configs` imports."""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# libtpu (the `tpu` extra, for AOT compiles) must not grab the default backend in tests.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A persistent compilation cache fresh for each session: tests that train, stop and resume
# build the same programs again in new trainer objects, and those recompiles dominated their
# time on 2 cores. Fresh per session, so every test still compiles its programs once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="illume-jax-test-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
