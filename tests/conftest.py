"""Test-wide setup: 8 fake CPU devices (set before jax is imported anywhere) and the repo
root on sys.path so `configs` imports."""
import fcntl
import os
import shutil
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# Test programs are tiny and run a few steps, so XLA:CPU's LLVM optimisation mostly costs compile
# time: at level 0 a scanned LLM's value-and-grad compiles ~3x faster, and the suite spends most
# of its time compiling. Semantics do not change (no fast-math either way); benchmarks and real
# runs keep the default. Set the flag yourself to test at another level.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# libtpu (the `tpu` extra, for AOT compiles) must not grab the default backend in tests.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Two test workers may compile for TPU topologies at once; libtpu's one-process-per-host lock
# guards a real TPU, and there is none here (it only compiles).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# No persistent compilation cache in tests. Reading XLA:CPU executables back from it segfaulted
# twice in full-suite CI runs (in `compilation_cache.get_executable_and_time`, while a resumed
# tokenizer trainer loaded the program its first run had cached) although every module passed
# alone, even with a fresh cache per module; a crash that depends on what else the process has
# loaded is not something a test suite can carry. Tests keep their compile counts small instead.
os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def micro_tokenizer_workdir(tmp_path_factory):
    """A micro DualViTok with a checkpoint (2 steps: consumers only need its codes and encoders).
    Session-wide and shared by the xdist workers (the first to ask trains it, under a file lock;
    the others wait and read it): the diffusion-decoder and MLLM tests only read it. Training it
    costs ~2 CPU minutes, which each worker used to pay."""
    from illume_jax.train import tokenizer as tok
    from train.test_tokenizer_train import micro_tokenizer_config
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this run's folder, above the per-worker ones
    workdir = root / "micro_tokenizer"
    with open(root / "micro_tokenizer.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (workdir / "trained").exists():
            shutil.rmtree(workdir, ignore_errors=True)  # a worker that died half-way
            config = micro_tokenizer_config()
            # Two plain steps: consumers need a checkpoint's weights, not the GAN switch-on or
            # dead-code restarts (the tokenizer tests' business), whose programs cost compiles.
            config.train.update(steps=2, disc_start=-1, dead_code_patience=0)
            tok.train_tokenizer(config, str(workdir))
            (workdir / "trained").touch()
    return str(workdir)


# The longest modules (~2-5 CPU minutes each), started first so the two workers end together.
# The first worker takes the MLLM module and trains the shared micro tokenizer; the second starts
# on modules that do not need it, so it rarely waits for the lock.
_SLOW_MODULES = ("tests/train/test_mllm_train.py", "tests/align/test_round.py",
                 "tests/train/test_tokenizer_train.py", "tests/train/test_decoder_train.py",
                 "tests/launch/test_colab_notebook.py", "tests/convert/test_convert_pipeline.py",
                 "tests/train/test_illume_v1_train.py")


def pytest_collection_modifyitems(config, items):
    """launch/local.sh runs the suite on 2 pytest-xdist workers with `--dist loadfile` (a module's
    tests on one worker: module fixtures are built once). xdist hands out modules in collection
    order (two each to start), so the slow ones go first."""
    def rank(item):
        path = item.nodeid.split("::")[0]
        return _SLOW_MODULES.index(path) if path in _SLOW_MODULES else len(_SLOW_MODULES)
    items.sort(key=rank)  # stable: the order within a module is kept


@pytest.fixture
def tiny_tokenizer_mllm():
    """A factory: seed -> an MLLM with a 32-wide, 2-head LLM over the tiny DualViTok (the vision tower
    of configs/dualvitok.py:size=tiny), its vocabulary sized for that tokenizer's codes."""
    from configs import common
    from configs import dualvitok as dualvitok_config
    from illume_jax.models import mllm

    def make(seed: int = 0):
        tok = dualvitok_config.model_config("tiny")
        rows = 100 + 7 + 32 + tok.semantic_codes + tok.pixel_codes + 5
        cfg = mllm.MLLMConfig.create(common.llm_config(text_vocab_size=100, vocab_size=rows, d_model=32, num_heads=2,
                                                       num_kv_heads=1, mlp_dim=64), tok)
        return mllm.create_mllm(cfg, seed=seed)
    return make
