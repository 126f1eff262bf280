"""The evaluation report page: self-contained HTML with every section, checked structurally and
in a real headless browser (Debian's Chromium, when installed): it loads with no error, every
embedded image decodes, and the metrics table is there."""
import glob
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from illume_jax.data import shapecomp
from illume_jax.eval import report
from illume_jax.eval import shapecomp_scorer as scorer


def _samples():
    t2i, pope, edit = [], [], []
    for i in range(6):
        scene = shapecomp.make_scene(1, "test", i)
        img = shapecomp.render(scene)
        text, meta = shapecomp.prompt_for(scene, shapecomp.available_tags(scene)[0])
        ok, why = scorer.grade(img, meta)
        t2i.append(dict(image=img, prompt=text, metadata=meta, prompt_id=i, correct=ok, reasons=why))
        for q in shapecomp.existence_questions(scene, "random")[:2]:
            pope.append(dict(image=img, scene=i, split="random", question=q["question"], answer="yes",
                             label=q["answer"], correct=q["answer"] == "yes"))
    for i in range(2):
        p = shapecomp.edit_pair(1, "test", i)
        before, after = shapecomp.render(p.before), shapecomp.render(p.after)
        edit.append(dict(before=before, edited=after, target=after, instruction=p.instruction, op=p.op, success=True,
                         preservation=1.0))
    return dict(level=1, split="test", t2i=t2i, pope=pope, edit=edit)


RESULTS = {"geneval": {"tags": {"single_object": 1.0, "colors": 0.5}, "overall": 0.75, "correct_images": 0.7,
                       "correct_prompts": 0.8},
           "pope": {"random": {"accuracy": 0.5, "f1": 0.6, "yes_ratio": 1.0}},
           "edit": {"success": 1.0, "preservation": 1.0, "per_op": {"recolor": 1.0}}}


def _write(tmp_path):
    samples = _samples()
    img = samples["t2i"][0]["image"]
    path = report.write_report(str(tmp_path / "report.html"), RESULTS, samples, title="t",
                               extra_metrics={"tokenizer ceiling": 0.57},
                               curves={"loss": [(1, 3.0), (2, 2.0), (3, 1.5)]}, reconstructions=[(img, img)])
    return path, samples


def test_report_is_self_contained_and_complete(tmp_path):
    path, samples = _write(tmp_path)
    page = open(path).read()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    expected = len(samples["t2i"]) + len(samples["pope"]) + 3 * len(samples["edit"]) + 2
    assert len(srcs) == expected and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(src|href)="(http|//|file:)', page) and "<script" not in page
    for row in ("single_object", "overall", "random: accuracy / F1 / yes-ratio", "tokenizer ceiling", "success"):
        assert f"<td>{row}</td>" in page
    assert page.count("<polyline") == 1 and "✓" in page


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    hits = glob.glob("/usr/lib/chromium/chromium")
    return hits[0] if hits else None


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    path, samples = _write(tmp_path)
    # A probe appended to a copy: after load, it records how many images decoded and the table size.
    probe = ("<script>window.addEventListener('load',()=>{const ok=[...document.images].filter("
             "i=>i.complete&&i.naturalWidth>0).length;document.body.setAttribute('data-decoded',ok);"
             "document.body.setAttribute('data-rows',document.querySelectorAll('#metrics-table tr').length);});</script>")
    probed = tmp_path / "probed.html"
    probed.write_text(open(path).read().replace("</body>", probe + "</body>"))
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--virtual-time-budget=10000", "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'profile'}"]
    r = subprocess.run(cmd + ["--dump-dom", f"file://{probed}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    n_images = len(samples["t2i"]) + len(samples["pope"]) + 3 * len(samples["edit"]) + 2
    assert f'data-decoded="{n_images}"' in r.stdout
    rows = int(re.search(r'data-rows="(\d+)"', r.stdout).group(1))
    assert rows == 1 + len(report.metrics_rows(RESULTS)) + 1  # header + metrics + the extra row
    assert "Uncaught" not in r.stderr and "Failed to load resource" not in r.stderr
    shot = tmp_path / "shot.png"
    subprocess.run(cmd + [f"--screenshot={shot}", "--window-size=1200,2000", f"file://{path}"], capture_output=True,
                   timeout=120, check=True)
    from PIL import Image
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 50  # text, frames and the embedded renders, not a blank page


def test_overview_picture_shows_each_part(tmp_path):
    """overview.png: the samples where they belong, green / red frames from the verdicts."""
    from PIL import Image
    samples = _samples()
    samples["t2i"][1]["correct"] = False
    img = samples["t2i"][0]["image"]
    path = report.write_overview(str(tmp_path / "o.png"), samples, [(img, img, img.repeat(2, 0).repeat(2, 1))])
    pic = np.asarray(Image.open(path).convert("RGB"))
    cell, pad, head_h = 128, 8, 18
    assert pic.shape[1] == pad + 6 * (cell + pad)            # six t2i samples in the widest row
    y0 = pad + head_h
    first = pic[y0:y0 + cell, pad:pad + cell]
    expect = np.asarray(Image.fromarray(img).resize((cell, cell), Image.NEAREST))
    np.testing.assert_array_equal(first[3:-3, 3:-3], expect[3:-3, 3:-3])   # inside the 3-pixel frame
    assert tuple(pic[y0 - 2, pad + 20]) == (0x22, 0xaa, 0x22)              # a correct sample: green frame
    assert tuple(pic[y0 - 2, 2 * pad + cell + 20]) == (0xcc, 0x22, 0x22)   # the wrong one: red
    with pytest.raises(ValueError, match="no samples"):
        report.overview_image({})
