"""The evaluation report: one self-contained HTML page (images embedded as PNG data URIs, curves as
inline SVG, no scripts or external files) and the public-harness files.

`write_report` renders what `eval/mllm.run_suites` returns — the metrics table (GenEval-style tags
and overall, POPE-style splits, editing success and preservation, plus any extra rows such as the
tokenizer ceiling or throughput), the text-to-image grid with each prompt under its image and the
scorer's verdict, understanding questions with right / wrong, editing before / after / target, and
optional tokenizer reconstructions and training curves.

`write_public_formats` writes the same samples in the layouts the public harnesses read, so a
checkpoint's outputs can also be scored by them where they apply:
  geneval/<prompt:05d>/metadata.jsonl + samples/<k:04d>.png   (djghosh13/geneval evaluate_images.py)
  pope/<split>_questions.jsonl, pope/<split>_answers.jsonl, pope/images/   (RUCAIBox/POPE evaluate.py;
      answers carry both 'answer' (POPE) and 'text' (LLaVA's eval_pope.py))
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import time
from typing import Iterable, Mapping, Sequence

import numpy as np

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def png_data_uri(image: np.ndarray, scale: int = 1) -> str:
    """An image (uint8 [H, W, 3]) as a PNG data URI; `scale` enlarges it with nearest pixels so that
    small renders stay crisp in the page."""
    from PIL import Image
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image: expected uint8 [H, W, 3], got {img.dtype} {img.shape}")
    if scale > 1:
        img = img.repeat(scale, 0).repeat(scale, 1)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(image: np.ndarray, alt: str, cls: str = "") -> str:
    scale = max(1, 128 // max(image.shape[:2]))
    return f'<img src="{png_data_uri(image, scale)}" alt="{html.escape(alt)}" class="{cls}">'


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))


def svg_curve(points: Sequence[tuple[float, float]], *, title: str, width: int = 420, height: int = 180) -> str:
    """A line plot of (step, value) as inline SVG, with the axes' ranges written on it."""
    pts = [(float(x), float(y)) for x, y in points if y is not None and np.isfinite(y)]
    if len(pts) < 2:
        return ""
    xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    pad, w, h = 36, width - 48, height - 44
    sx = (xs - x0) / ((x1 - x0) or 1.0) * w + pad
    sy = (1.0 - (ys - y0) / ((y1 - y0) or 1.0)) * h + 22
    line = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(sx, sy))
    return (f'<svg class="curve" width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">'
            f'<text x="{pad}" y="14" class="t">{html.escape(title)}</text>'
            f'<rect x="{pad}" y="22" width="{w}" height="{h}" class="frame"/>'
            f'<polyline points="{line}" class="line"/>'
            f'<text x="2" y="30" class="a">{y1:.3g}</text><text x="2" y="{22 + h}" class="a">{y0:.3g}</text>'
            f'<text x="{pad}" y="{height - 6}" class="a">{x0:.0f}</text>'
            f'<text x="{pad + w - 30}" y="{height - 6}" class="a">{x1:.0f}</text></svg>')


def read_curves(metrics_jsonl: str, keys: Iterable[str] = ("loss", "text_loss", "image_loss")) -> dict:
    """{key: [(step, value)]} from a training run's metrics.jsonl (absent file: {})."""
    out: dict = {k: [] for k in keys}
    if not os.path.exists(metrics_jsonl):
        return {}
    with open(metrics_jsonl) as f:
        for line in f:
            row = json.loads(line)
            for k in out:
                if isinstance(row.get(k), (int, float)):
                    out[k].append((row["step"], row[k]))
    return {k: v for k, v in out.items() if len(v) >= 2}


def metrics_rows(results: Mapping) -> list[tuple[str, str, str]]:
    """(group, metric, value) rows of the metrics table."""
    rows = []
    g = results.get("geneval")
    if g:
        for tag in TAGS:
            if tag in g["tags"]:
                rows.append(("GenEval-style", tag, _fmt(g["tags"][tag])))
        rows.append(("GenEval-style", "overall", _fmt(g["overall"])))
        for k in ("correct_images", "correct_prompts"):
            if k in g:
                rows.append(("GenEval-style", k.replace("_", " "), _fmt(g[k])))
    p = results.get("pope")
    if p:
        for split, m in p.items():
            if "auc" in m:  # results written before the margin AUC existed lack it
                rows.append(("POPE-style", f"{split}: accuracy / F1 / yes-ratio / margin AUC",
                             f"{m['accuracy']:.3f} / {m['f1']:.3f} / {m['yes_ratio']:.3f} / {m['auc']:.3f}"))
            else:
                rows.append(("POPE-style", f"{split}: accuracy / F1 / yes-ratio",
                             f"{m['accuracy']:.3f} / {m['f1']:.3f} / {m['yes_ratio']:.3f}"))
            if m.get("by_kind"):  # what the asked object shares with the scene (shapecomp.EXISTENCE_KINDS)
                rows.append(("POPE-style", f"{split}: accuracy by asked object",
                             ", ".join(f"{k.replace('_', ' ')} {v['accuracy']:.2f} (n={v['questions']})"
                                       for k, v in m["by_kind"].items())))
    e = results.get("edit")
    if e:
        rows.append(("editing", "success", _fmt(e["success"])))
        rows.append(("editing", "preservation", _fmt(e["preservation"])))
        for op, v in e.get("per_op", {}).items():
            rows.append(("editing", f"success: {op}", _fmt(v)))
    return rows


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:140px;font-size:12px}figure img{display:block;image-rendering:pixelated}
.ok{border:3px solid #2a2}.bad{border:3px solid #c33}.yes{color:#2a2;font-weight:600}.no{color:#c33;font-weight:600}
.row{display:flex;gap:6px;align-items:flex-end}.muted{color:#777;font-size:12px}
svg.curve .frame{fill:none;stroke:#bbb}svg.curve .line{fill:none;stroke:#2563eb;stroke-width:1.5}
svg.curve .t{font-size:12px}svg.curve .a{font-size:10px;fill:#555}
"""


def render_html(results: Mapping, samples: Mapping | None = None, *, title: str = "illume_jax evaluation",
                subtitle: str = "", extra_metrics: Mapping[str, str] | None = None,
                curves: Mapping[str, Sequence[tuple[float, float]]] | None = None,
                reconstructions: Sequence[tuple[np.ndarray, ...]] = (),
                max_t2i: int = 48, max_pope: int = 24, max_edit: int = 16) -> str:
    """The report page as one HTML string."""
    samples = samples or {}
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    out.append(f"<p class='muted'>{html.escape(subtitle)} · written {time.strftime('%Y-%m-%d %H:%M:%S')}</p>")
    out.append("<h2 id='metrics'>Metrics</h2><table id='metrics-table'><tr><th>group</th><th>metric</th>"
               "<th>value</th></tr>")
    for group, name, value in metrics_rows(results):
        out.append(f"<tr><td>{group}</td><td>{html.escape(name)}</td><td>{value}</td></tr>")
    for name, value in (extra_metrics or {}).items():
        out.append(f"<tr><td>other</td><td>{html.escape(name)}</td><td>{_fmt(value)}</td></tr>")
    out.append("</table>")
    if samples.get("t2i"):
        out.append(f"<h2 id='t2i'>Text to image</h2><p class='muted'>green frame: the scorer finds the prompt "
                   f"satisfied; red: not (hover for why). First {min(max_t2i, len(samples['t2i']))} of "
                   f"{len(samples['t2i'])}.</p><div class='grid'>")
        for s in samples["t2i"][:max_t2i]:
            why = "; ".join(s.get("reasons") or []) or "correct"
            out.append(f"<figure title='{html.escape(why)}'>{_img(s['image'], s['prompt'], 'ok' if s['correct'] else 'bad')}"
                       f"<figcaption>{'✓' if s['correct'] else '✗'} {html.escape(s['prompt'])}</figcaption></figure>")
        out.append("</div>")
    if samples.get("pope"):
        # An even spread over the splits rather than the first split only.
        rows = samples["pope"]
        pick = rows[:: max(1, len(rows) // max_pope)][:max_pope]
        out.append(f"<h2 id='understanding'>Understanding</h2><table><tr><th>image</th><th>split</th>"
                   f"<th>question</th><th>answer</th><th>truth</th><th></th></tr>")
        for s in pick:
            mark = "<span class='yes'>right</span>" if s["correct"] else "<span class='no'>wrong</span>"
            out.append(f"<tr><td>{_img(s['image'], s['question'])}</td><td>{s['split']}</td>"
                       f"<td>{html.escape(s['question'])}</td><td>{html.escape(s['answer'])}</td>"
                       f"<td>{s['label']}</td><td>{mark}</td></tr>")
        out.append("</table>")
    if samples.get("edit"):
        out.append("<h2 id='editing'>Editing</h2><p class='muted'>before · edited · target (the exact render)</p>"
                   "<div class='grid'>")
        for s in samples["edit"][:max_edit]:
            cls = "ok" if s["success"] else "bad"
            out.append(f"<figure style='width:420px'><div class='row'>{_img(s['before'], 'before')}"
                       f"{_img(s['edited'], 'edited', cls)}{_img(s['target'], 'target')}</div><figcaption>"
                       f"{'✓' if s['success'] else '✗'} {html.escape(s['instruction'])} ({s['op']}, preservation "
                       f"{s['preservation']:.2f})</figcaption></figure>")
        out.append("</div>")
    if reconstructions:
        names = ("original", "tokenizer reconstruction", "diffusion decoder (2x)")[:len(reconstructions[0])]
        out.append(f"<h2 id='tokenizer'>Tokenizer reconstructions</h2><p class='muted'>{' · '.join(names)}"
                   f"</p><div class='grid'>")
        for images in reconstructions:
            row = "".join(_img(im, name) for im, name in zip(images, names))
            out.append(f"<figure style='width:{140 * len(images)}px'><div class='row'>{row}</div></figure>")
        out.append("</div>")
    if curves:
        out.append("<h2 id='curves'>Training curves</h2><div class='grid'>")
        for name, pts in curves.items():
            out.append(svg_curve(pts, title=name))
        out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out)


def overview_image(samples: Mapping, reconstructions: Sequence[tuple[np.ndarray, ...]] = (), *, cell: int = 128,
                   max_t2i: int = 6, max_edit: int = 3, max_recon: int = 2) -> np.ndarray:
    """One picture of a run (uint8 [H, W, 3]): text-to-image samples framed green (the scorer finds
    the prompt satisfied) or red, each over its prompt; editing before -> edited (target); tokenizer
    reconstructions. For READMEs and notebooks, where the HTML report does not render."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default()
    pad, text_h, head_h = 8, 30, 18
    rows: list[tuple[str, list[tuple[np.ndarray, str, str | None]]]] = []  # (title, [(image, caption, frame)])
    t2i = list(samples.get("t2i") or [])[:max_t2i]
    if t2i:
        rows.append(("text to image (green: correct per the scorer)",
                     [(s["image"], s["prompt"], "#2a2" if s["correct"] else "#c22") for s in t2i]))
    edits = list(samples.get("edit") or [])[:max_edit]
    if edits:
        cells = []
        for s in edits:
            cells += [(s["before"], "before", None), (s["edited"], s["instruction"], "#2a2" if s["success"] else "#c22")]
        rows.append(("editing: before, edited", cells))
    if reconstructions:
        names = ("original", "tokenizer", "decoder 2x")
        rows.append(("tokenizer reconstructions and the diffusion decoder",
                     [(im, names[i], None) for r in reconstructions[:max_recon] for i, im in enumerate(r)]))
    if not rows:
        raise ValueError("overview_image: no samples (t2i / edit) and no reconstructions to show")
    cols = max(len(c) for _, c in rows)
    width = pad + cols * (cell + pad)
    height = sum(head_h + cell + text_h + pad for _ in rows) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad
    for title, cells in rows:
        draw.text((pad, y), title, fill="black", font=font)
        y += head_h
        for i, (image, caption, frame) in enumerate(cells):
            x = pad + i * (cell + pad)
            img = Image.fromarray(np.asarray(image, np.uint8)).resize((cell, cell), Image.NEAREST)
            canvas.paste(img, (x, y))
            if frame:
                draw.rectangle([x - 2, y - 2, x + cell + 1, y + cell + 1], outline=frame, width=3)
            words, lines = caption.split(), [""]
            for w in words:  # wrap to the cell's width, two lines at most
                if draw.textlength((lines[-1] + " " + w).strip(), font=font) > cell:
                    lines.append(w)
                else:
                    lines[-1] = (lines[-1] + " " + w).strip()
            draw.text((x, y + cell + 3), "\n".join(lines[:2]), fill="#333", font=font)
        y += cell + text_h + pad
    return np.asarray(canvas)


def write_overview(path: str, samples: Mapping, reconstructions: Sequence[tuple[np.ndarray, ...]] = ()) -> str:
    from PIL import Image
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(overview_image(samples, reconstructions)).save(path, optimize=True)
    return path


def write_report(path: str, results: Mapping, samples: Mapping | None = None, **kw) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(render_html(results, samples, **kw))
    return path


def write_public_formats(out_dir: str, samples: Mapping) -> dict:
    """GenEval's and POPE's file layouts for every sample; returns the paths written."""
    from PIL import Image
    written = {}
    if samples.get("t2i"):
        root = os.path.join(out_dir, "geneval")
        counts: dict = {}
        for s in samples["t2i"]:
            folder = os.path.join(root, f"{s['prompt_id']:05d}")
            k = counts.get(s["prompt_id"], 0)
            counts[s["prompt_id"]] = k + 1
            os.makedirs(os.path.join(folder, "samples"), exist_ok=True)
            if k == 0:
                with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
                    f.write(json.dumps(dict(s["metadata"], prompt=s["prompt"])) + "\n")
            Image.fromarray(s["image"]).save(os.path.join(folder, "samples", f"{k:04d}.png"))
        with open(os.path.join(root, "evaluation_metadata.jsonl"), "w") as f:
            for pid in sorted(counts):
                f.write(open(os.path.join(root, f"{pid:05d}", "metadata.jsonl")).read())
        written["geneval"] = root
    if samples.get("pope"):
        root = os.path.join(out_dir, "pope")
        os.makedirs(os.path.join(root, "images"), exist_ok=True)
        saved = set()
        by_split: dict = {}
        for s in samples["pope"]:
            by_split.setdefault(s["split"], []).append(s)
        for split, rows in by_split.items():
            with open(os.path.join(root, f"{split}_questions.jsonl"), "w") as fq, \
                 open(os.path.join(root, f"{split}_answers.jsonl"), "w") as fa:
                for qid, s in enumerate(rows, 1):
                    name = f"{samples.get('split', 'test')}_{s['scene']:05d}.png"
                    if name not in saved:
                        Image.fromarray(s["image"]).save(os.path.join(root, "images", name))
                        saved.add(name)
                    fq.write(json.dumps(dict(question_id=qid, image=name, text=s["question"], label=s["label"])) + "\n")
                    fa.write(json.dumps(dict(question_id=qid, question=s["question"], answer=s["answer"],
                                             text=s["answer"])) + "\n")
        written["pope"] = root
    return written
