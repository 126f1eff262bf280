"""Two local CPU processes train together on one 4-device mesh and write one Orbax checkpoint."""
import json
import os
import socket
import subprocess
import sys

from configs import tiny
from illume_jax.data import build
from illume_jax.data.tokenizers import load_or_train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OVERRIDES = ["--config.data.datasets.shapecomp_caption.num_examples=40",
             "--config.data.datasets.shapecomp_qa.num_examples=40", "--config.checkpoint.every_steps=100"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_and_checkpoint_together(tmp_path):
    arg = "steps=3,seq_len=64,batch=8"
    # Build data and tokenizer once up front, so the two processes only read them.
    c = tiny.get_config(arg)
    c.data.datasets.shapecomp_caption.num_examples = 40
    c.data.datasets.shapecomp_qa.num_examples = 40
    build.build_datasets(c, str(tmp_path / "data"))
    load_or_train_tokenizer(c, str(tmp_path))

    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_PROCESS_COUNT="2", JAX_PROCESS_ID=str(pid),
                   JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                   XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
                   PYTHONPATH=ROOT)  # (the suite's optimisation level: tests/conftest.py)
        cmd = [sys.executable, "-m", "illume_jax", "train", f"--config=configs/tiny.py:{arg}",
               f"--workdir={tmp_path}", *OVERRIDES]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    ckpt = tmp_path / "checkpoints"
    steps = sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())
    assert steps and steps[-1] == 4  # 3 + 1 steps over the two stages
    last = ckpt / str(steps[-1])
    # One checkpoint: one state, one meta, and a Grain iterator state per process.
    assert sorted(f for f in os.listdir(last / "data") if f.endswith(".json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    assert sorted(d for d in os.listdir(last) if (last / d).is_dir()) == ["data", "meta", "state"]
    assert (last / "commit_success.txt").exists()  # finalised, not a partial write
    meta_files = [f for f in os.listdir(last / "meta") if not f.startswith("_") and not f.endswith(".txt")]
    meta = json.loads((last / "meta" / meta_files[0]).read_text())
    assert meta["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1} and meta["stage_name"] == "sft"
    # Only process 0 writes metrics, and it saw every step.
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows][-1] == 4 and all(r["loss"] > 0 for r in rows)
