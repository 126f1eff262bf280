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

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _compilation_cache_per_module(tmp_path_factory):
    """A fresh persistent compilation cache for each test module. Stop-and-resume tests still
    reuse what their first run compiled; executables are never deserialized into another
    module's tests: a full-suite run segfaulted once in XLA:CPU's executable deserialization
    (test_tokenizer_train reading a program the MLLM / decoder modules had cached), a known
    fragility of CPU executable loading, while each module alone passed."""
    import jax
    from jax._src import compilation_cache
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax-cache")))
    compilation_cache.reset_cache()
    yield


@pytest.fixture(scope="session")
def micro_tokenizer_workdir(tmp_path_factory):
    """A micro DualViTok with a checkpoint (2 steps: consumers only need its codes and encoders).
    Session-wide: the diffusion-decoder and MLLM tests share it."""
    from illume_jax.train import tokenizer as tok
    from train.test_tokenizer_train import micro_dualvitok
    config = micro_dualvitok(perceptual="none", steps=2, disc_start=-1)
    config.vit_pretrain.steps = 0
    workdir = str(tmp_path_factory.mktemp("tokenizer"))
    tok.train_tokenizer(config, workdir)
    return workdir
