"""launch/colab_demo.ipynb runs headless on CPU (nbclient, a real IPython kernel) with micro sizes:
it trains the tiny MLLM config for a few steps on a trained micro tokenizer, then generates, answers and edits,
and every output cell shows what it should (inline images, answers) with no error."""
import json
import os

import nbclient  # the test extra
import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(ROOT, "launch", "colab_demo.ipynb")

MICRO = {
    "INSTALL": False,
    # Only the SFT stage of a micro LLM (the MLLM tests' sizes): every stage is a new train-step
    # program to compile, and the stages themselves are tests/train/test_mllm_train.py's business.
    "MLLM_ARGS": "steps=2,batch=2,vocab=128,stages=3",
    "MLLM_OVERRIDES": {**{f"data.datasets.shapecomp_{t}.num_examples": 8
                          for t in ("caption", "qa", "t2i", "edit", "recon")},
                       "model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2, "model.num_kv_heads": 1,
                       "model.head_dim": 16, "model.mlp_dim": 64},
}


def test_notebook_runs_headless_on_cpu(tmp_path, micro_tokenizer_workdir):
    """The notebook trains the MLLM on the suite's shared micro tokenizer (its `TOKENIZER_DIR`
    parameter): training a tokenizer in the kernel cost ~1 CPU minute, and that path is
    `train-tokenizer`'s own (tests/train/test_tokenizer_train.py)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    # Papermill's convention: a cell right after the parameters cell overrides them.
    values = dict(MICRO, RUN_DIR=str(tmp_path / "run"), TOKENIZER_DIR=micro_tokenizer_workdir)
    overrides = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    nb.cells.insert(nb.cells.index(params[0]) + 1, nbformat.v4.new_code_cell(overrides))
    # The kernel sees this checkout and one CPU device, as on a Colab CPU runtime (not the test
    # session's 8 fake devices).
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "XLA_FLAGS")}
    os.environ["PYTHONPATH"] = ROOT + (os.pathsep + saved["PYTHONPATH"] if saved["PYTHONPATH"] else "")
    # (keeping the suite's XLA optimisation level: tests/conftest.py)
    os.environ["XLA_FLAGS"] = " ".join(f for f in saved["XLA_FLAGS"].split() if "device_count" not in f)
    try:
        client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                         resources={"metadata": {"path": ROOT}})
        client.execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "backend: cpu" in text and "Q: Is there" in text
    html = [o["data"]["text/html"] for o in outputs if o.output_type == "display_data" and "text/html" in o["data"]]
    # t2i grid (4 images), the understanding picture, 3 edit rows (3 images each).
    assert len(html) == 1 + 1 + 3
    assert sum(h.count("data:image/png;base64,") for h in html) == 4 + 1 + 9
    assert os.path.isdir(tmp_path / "run" / "mllm" / "checkpoints")
    json.dumps(nb)  # the executed notebook stays serialisable
