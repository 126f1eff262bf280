"""What the scripts that probe a trained MLLM share (position_probe.py, code_stats.py, edit_probe.py):
the model's command-line arguments, loading it, and the timed JSON result, printed and written."""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable


def parser(doc: str | None) -> argparse.ArgumentParser:
    """--workdir, --step and --out; a script adds its own arguments."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a `train` workdir of an MLLM config")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--out", default=None, help="JSON file for the result")
    return p


def run(args: argparse.Namespace, probe: Callable[..., dict], **settings) -> dict:
    """Loads the `Illume` of args.workdir / args.step, runs probe(model) and prints (and with args.out
    writes) {workdir, step, **settings, **probe's result, seconds}."""
    from illume_jax import Illume
    t0 = time.perf_counter()
    model = Illume.load(args.workdir, step=args.step)
    result = dict(workdir=os.path.abspath(args.workdir), step=args.step, **settings, **probe(model),
                  seconds=round(time.perf_counter() - t0, 1))
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result
