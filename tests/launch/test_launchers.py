"""launch/tpu_pod.sh, gpu_cluster.sh, sweep.sh and gpu_box.sh: --dry-run prints every command and runs none; a
real run issues exactly those commands (gcloud / scontrol / srun / sbatch replaced by recorders on
PATH); bad arguments fail with a message that names them."""
import json
import os
import shlex
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _recorders(tmp_path, *names):
    """Fake executables that append their argv (and the JAX_* environment) as JSON to calls.jsonl."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls.jsonl"
    for name in names:
        path = bin_dir / name
        path.write_text(f"""#!/usr/bin/env python3
import json, os, sys
env = {{k: v for k, v in os.environ.items() if k.startswith("JAX_")}}
with open({str(log)!r}, "a") as f:
    f.write(json.dumps(dict(argv=[{name!r}] + sys.argv[1:], env=env)) + "\\n")
if {name!r} == "scontrol":
    print("node7\\nnode8")
""")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bin_dir, log


def _calls(log):
    return [json.loads(line) for line in open(log)] if os.path.exists(log) else []


def _run(args, bin_dir=None, **env):
    e = dict(os.environ, **env)
    if bin_dir is not None:
        e["PATH"] = f"{bin_dir}:{e['PATH']}"
    return subprocess.run(["bash", *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=60)


POD = ["launch/tpu_pod.sh"]
BASE = ["--name=pod1", "--zone=us-east5-a", "--project=proj"]


def test_tpu_pod_dry_run_prints_every_command_and_runs_none(tmp_path):
    bin_dir, log = _recorders(tmp_path, "gcloud", "git")
    r = _run(POD + ["up", "--dry-run", *BASE, "--accelerator=v5p-64", "--bucket=gs://bkt/", "--spot",
                    "--", "--config.stages[0].steps=3"], bin_dir)
    assert r.returncode == 0, r.stderr
    lines = [shlex.split(line) for line in r.stdout.strip().splitlines()]
    assert lines[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod1", "--zone=us-east5-a", "--project=proj",
                        "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--spot"]
    assert lines[1][:2] == ["git", "archive"]
    assert lines[2][4] == "scp" and "--worker=all" in lines[2]
    setup, run = lines[3], lines[4]
    assert setup[4] == "ssh" and "--worker=all" in setup and "uv pip install" in setup[-1]
    remote = run[-1].split("=", 1)[1]
    assert "--worker=all" in run
    assert "JAX_DISTRIBUTED_AUTO=1" in remote and "JAX_COMPILATION_CACHE_DIR=gs://bkt/jax_cache" in remote
    argv = shlex.split(remote.split("nohup ", 1)[1].split(" >", 1)[0])
    assert argv == [".venv/bin/python", "-m", "illume_jax", "train", "--config=configs/illume_plus_7b.py",
                    "--workdir=runs/pod1", "--config.checkpoint.directory=gs://bkt/pod1/checkpoints",
                    "--config.stages[0].steps=3"]
    assert _calls(log) == []  # nothing ran


def test_tpu_pod_runs_the_printed_commands(tmp_path):
    bin_dir, log = _recorders(tmp_path, "gcloud")
    for action in ("run", "tail", "stop", "delete"):
        r = _run(POD + [action, *BASE, "--bucket=gs://bkt", "--config=configs/illume_plus_3b.py"], bin_dir)
        assert r.returncode == 0, r.stderr
        printed = shlex.split(r.stdout.strip().splitlines()[-1])
        assert _calls(log)[-1]["argv"] == printed
    calls = [c["argv"] for c in _calls(log)]
    assert "--worker=all" in calls[0] and "--worker=0" in calls[1] and "tail -n 200 -F" in calls[1][-1]
    assert "pkill -TERM" in calls[2][-1] and calls[3][4:6] == ["delete", "pod1"] and "--quiet" in calls[3]


@pytest.mark.parametrize("args, message", [
    (["run", "--zone=z"], "--name=NAME is required"),
    (["run", "--name=n"], "--zone=ZONE is required"),
    (["run", "--name=n", "--zone=z"], "run needs --bucket=gs://BUCKET"),
    (["run", "--name=n", "--zone=z", "--bucket=/local"], "--bucket=/local: expected a gs:// URL"),
    (["launch", "--name=n", "--zone=z"], "unknown action 'launch'"),
    (["create", "--name=n", "--zone=z", "--accelerator"], "unknown option '--accelerator'"),
])
def test_tpu_pod_bad_arguments(args, message):
    r = _run(POD + args)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_gpu_cluster_batch_script_sets_up_jax_distributed(tmp_path):
    bin_dir, log = _recorders(tmp_path, "scontrol", "srun", "sbatch")
    workdir = tmp_path / "run"
    args = ["launch/gpu_cluster.sh", "--nodes=2", "--gpus_per_node=4", "--partition=gpu", f"--workdir={workdir}",
            "--config=configs/illume_plus_7b.py", "--", "--config.stages[0].steps=3"]
    dry = _run(args[:-2] + ["--dry-run", "--", "--config.stages[0].steps=3"], bin_dir)
    assert dry.returncode == 0, dry.stderr
    script, submit = dry.stdout.rsplit("\n", 2)[0], dry.stdout.strip().splitlines()[-1]
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", f"#SBATCH --output={workdir}/slurm/%x-%j.out"):
        assert line in script
    assert submit == f"sbatch {workdir}/slurm/illume_jax.sbatch"

    # The batch script itself, as SLURM would start it on the first node.
    sbatch = tmp_path / "job.sbatch"
    sbatch.write_text(script + "\n")
    r = subprocess.run(["bash", str(sbatch)], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node[7-8]",
                                SLURM_NNODES="2"))
    assert r.returncode == 0, r.stderr
    srun = [c for c in _calls(log) if c["argv"][0] == "srun"][-1]
    assert srun["env"]["JAX_COORDINATOR_ADDRESS"] == "node7:12345" and srun["env"]["JAX_PROCESS_COUNT"] == "2"
    assert srun["env"]["JAX_COMPILATION_CACHE_DIR"] == f"{workdir}/jax_cache"
    inner = srun["argv"][-1]
    assert inner.startswith("JAX_PROCESS_ID=$SLURM_PROCID exec .venv/bin/python -m illume_jax train ")
    assert shlex.split(inner)[-3:] == ["--config=configs/illume_plus_7b.py", f"--workdir={workdir}",
                                       "--config.stages[0].steps=3"]
    # maybe_initialize_distributed reads exactly these variables.
    src = open(os.path.join(ROOT, "illume_jax", "sharding.py")).read()
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_COUNT", "JAX_PROCESS_ID"):
        assert f'"{var}"' in src


def test_gpu_cluster_submits_and_rejects_bad_arguments(tmp_path):
    bin_dir, log = _recorders(tmp_path, "sbatch")
    assert os.path.exists(os.path.join(ROOT, ".venv", "bin", "python")), "run the tests through launch/local.sh"
    workdir = tmp_path / "run"
    r = _run(["launch/gpu_cluster.sh", "--nodes=1", "--config=configs/tiny.py", f"--workdir={workdir}"], bin_dir)
    assert r.returncode == 0, r.stderr
    assert _calls(log)[-1]["argv"] == ["sbatch", f"{workdir}/slurm/illume_jax.sbatch"]
    assert "#SBATCH --nodes=1" in open(f"{workdir}/slurm/illume_jax.sbatch").read()
    for args, message in ((["--config=c", "--workdir=w"], "--nodes=N is required"),
                          (["--nodes=2", "--workdir=w"], "--config=configs/NAME.py[:args] is required"),
                          (["--nodes=2", "--config=c"], "--workdir=DIR is required"),
                          (["--nodes=2", "--config=c", "--workdir=w", "--gpus=8"], "unknown option '--gpus=8'")):
        r = _run(["launch/gpu_cluster.sh", *args])
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)


def test_sweep_runs_the_cross_product_and_prints_pod_commands(tmp_path):
    bin_dir, log = _recorders(tmp_path, "runner")
    args = ["launch/sweep.sh", "--config=configs/illume_tiny.py:levels=1", "--grid=steps=200,400 batch=8,16",
            f"--root={tmp_path}/sweep", "--", "--config.seed=3"]
    dry = _run(args[:1] + ["--dry-run"] + args[1:], bin_dir, ILLUME_SWEEP_RUNNER=str(bin_dir / "runner"))
    assert dry.returncode == 0 and "sweep: 4 runs" in dry.stderr and _calls(log) == []
    r = _run(args, bin_dir, ILLUME_SWEEP_RUNNER=str(bin_dir / "runner"))
    assert r.returncode == 0, r.stderr
    calls = [c["argv"][1:] for c in _calls(log)]
    assert [shlex.split(line)[1:] for line in r.stdout.strip().splitlines()] == calls == [
        ["train", f"--config=configs/illume_tiny.py:levels=1,steps={s},batch={b}",
         f"--workdir={tmp_path}/sweep/steps-{s}_batch-{b}", "--config.seed=3"]
        for s in (200, 400) for b in (8, 16)]
    # Every combination parses as config arguments of that config.
    from configs import illume_tiny
    for call in calls:
        illume_tiny.get_config(call[1].split(":", 1)[1])
    # A pipeline sweep (the ablation configs): each run's root is its workdir, then the summary.
    log.unlink()
    r = _run(["launch/sweep.sh", "--config=configs/ablation_tokenizer.py:scale=smoke", "--grid=tokenizer=semantic,pixel",
              "--command=pipeline", f"--root={tmp_path}/abl"], bin_dir, ILLUME_SWEEP_RUNNER=str(bin_dir / "runner"))
    assert r.returncode == 0, r.stderr
    assert [c["argv"][1:] for c in _calls(log)] == [
        ["pipeline", f"--config=configs/ablation_tokenizer.py:scale=smoke,tokenizer={t},root={tmp_path}/abl/tokenizer-{t}",
         f"--workdir={tmp_path}/abl/tokenizer-{t}"] for t in ("semantic", "pixel")] + [
        ["summarize", f"--workdir={tmp_path}/abl"]]
    from configs import ablation_tokenizer
    for call in _calls(log)[:2]:
        c = ablation_tokenizer.get_config(call["argv"][2].split(":", 1)[1])
        assert c.root == call["argv"][3].split("=", 1)[1]
    pod = _run(["launch/sweep.sh", "--dry-run", "--config=configs/illume_tiny.py", "--grid=steps=200,400",
                "--pod=abl", "--zone=z", "--bucket=gs://b"])
    lines = [shlex.split(line) for line in pod.stdout.strip().splitlines()]
    assert [line[:4] for line in lines] == [["bash", "launch/tpu_pod.sh", "up", f"--name=abl-{i}"] for i in (0, 1)]
    assert "--config=configs/illume_tiny.py:steps=400" in lines[1] and "--bucket=gs://b" in lines[1]


@pytest.mark.parametrize("args, message", [
    (["--grid=a=1"], "--config=configs/NAME.py[:args] is required"),
    (["--config=configs/tiny.py"], "--grid='KEY=V1,V2 ...' is required"),
    (["--config=configs/nope.py", "--grid=a=1"], "no such file 'configs/nope.py'"),
    (["--config=configs/tiny.py", "--grid=steps"], "--grid entry 'steps': expected KEY=V1,V2"),
    (["--config=configs/tiny.py", "--grid=steps=1", "--pod=p"], "--pod needs --zone=ZONE"),
])
def test_sweep_bad_arguments(args, message):
    r = _run(["launch/sweep.sh", *args])
    assert r.returncode == 2 and message in r.stderr, r.stderr


def _fake_python(tmp_path):
    """A `python` for launch/gpu_box.sh: records each `-m illume_jax` call, hangs in `train` (so
    the box must end it), prints eval's per-suite lines in `eval`."""
    path, log = tmp_path / "fake_python", tmp_path / "calls.jsonl"
    path.write_text(f"""#!/usr/bin/env python3
import json, os, sys, time
args = sys.argv[1:]
with open({str(log)!r}, "a") as f:
    f.write(json.dumps(args[2:]) + "\\n")
if args[2] in ("train", "train-tokenizer"):
    time.sleep(60)
else:
    print("eval: geneval done after 9.0 s: GenEval-style overall 0.250", flush=True)
    if os.environ.get("FAKE_EVAL_STOPPED"):  # a run stopped after its first suite
        sys.exit(124)
    print("eval: edit done after 30.0 s: GenEval-style overall 0.250, editing success 0.500", flush=True)
""")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path, log


def test_gpu_box_ends_training_at_its_box_and_still_evaluates(tmp_path):
    python, log = _fake_python(tmp_path)
    workdir = tmp_path / "run"
    r = _run(["launch/gpu_box.sh", f"--workdir={workdir}", f"--python={python}", "--train_s=2", "--eval_s=30",
              "--", "--gen_scenes=4"])
    assert r.returncode == 0, r.stderr
    calls = _calls(log)
    assert [c[0] for c in calls] == ["train", "eval"]
    assert calls[0][1].startswith("--config=configs/illume_tiny.py:") and "device=gpu" in calls[0][1]
    assert calls[1] == ["eval", f"--workdir={workdir}", "--gen_scenes=4"]
    assert "train exit 124" in r.stdout  # the box, not the (hanging) trainer, ended training
    assert "eval: edit done after 30.0 s: GenEval-style overall 0.250, editing success 0.500" in r.stdout
    assert (workdir / "BOX_DONE").exists() and "eval exit 0" in (workdir / "box.log").read_text()
    # An evaluation stopped by its box: the suites it finished are still reported.
    stopped = tmp_path / "stopped"
    r = _run(["launch/gpu_box.sh", f"--workdir={stopped}", f"--python={python}", "--train_s=1"], FAKE_EVAL_STOPPED="1")
    assert r.returncode == 0, r.stderr
    assert "eval exit 124" in r.stdout and "eval: geneval done after 9.0 s: GenEval-style overall 0.250" in r.stdout


def test_gpu_box_trains_the_tokenizer_first_when_asked(tmp_path):
    python, log = _fake_python(tmp_path)
    workdir = tmp_path / "run"
    r = _run(["launch/gpu_box.sh", f"--workdir={workdir}", f"--python={python}", "--tokenizer_s=1", "--train_s=1",
              "--eval_s=30"])
    assert r.returncode == 0, r.stderr
    calls = _calls(log)
    assert [c[0] for c in calls] == ["train-tokenizer", "train", "eval"]
    assert calls[0][1] == "--config=configs/dualvitok.py:size=tiny,pixel_grid=32,steps=1800,workers=8"
    assert f"--workdir={workdir}/tokenizer" in calls[0] and "--config.model.pixel_decoder.ch=64" in calls[0]
    assert calls[1][1].endswith(f",tokenizer={workdir}/tokenizer")   # the MLLM trains on it
    assert "tokenizer exit 124" in r.stdout and "train exit 124" in r.stdout
    assert (workdir / "BOX_DONE").exists()


@pytest.mark.parametrize("args, message", [
    ([], "--workdir=DIR is required"),
    (["--workdir=w", "--tokenizer_s=-5"], "--tokenizer_s: expected a number of seconds"),
    (["--workdir=w", "--train_s=soon"], "--train_s: expected a positive number of seconds"),
    (["--workdir=w", "--python=no_such_python"], "--python=no_such_python: not found"),
    (["--workdir=w", "--steps=3"], "unknown option '--steps=3'"),
])
def test_gpu_box_bad_arguments(args, message):
    r = _run(["launch/gpu_box.sh", *args])
    assert r.returncode == 2 and message in r.stderr, r.stderr
