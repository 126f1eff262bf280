"""Image-generation throughput of the MLLM with CFG: our jitted per-row loop vs `transformers`' generate().

  python bench/generate.py                          # tiny and small, batch 1 and 8 (CPU: ~10 minutes)
  python bench/generate.py --sizes small --batch 8 --no-torch
  python bench/generate.py --sizes small --no-torch --compare-scan   # + the accelerator path (scanned layers)

Workload: text-to-image at the ILLUME+ 256x256 layout (spec §4.6): the prompt ends with the
resolution tags and <start_of_image>; 367 more tokens complete the 368-token block (9x9 semantic
rows + 16x16 pixel rows with their EOLs and the structure tokens). CFG 2.0 against an
unconditional prompt, temperature 1.0, top-k 2048 (the official T2I settings, spec §4.2), the
official vocabulary layout (283,047 rows: Qwen2.5 text + 131,111 image / structure ids).

  - jax:   `infer.interleaved.generate`: prefill + one `lax.while_loop`, CFG as 2B rows of one
           batch (combined before the head), per-row masks as array ops, layers unrolled over
           per-layer weights (the CPU default; `--compare-scan` also times the scanned layers
           that accelerators use, in the same process).
  - torch: `Qwen2ForCausalLM.generate(do_sample=True, top_k=2048)` with a LogitsProcessor doing
           what the official InterleavedLogitsProcessor does (spec §4.1): the state read from row
           0's last token, the unconditional branch as a second model call per token with its own
           KV cache, CFG in log-prob space, the structure masks. Same weights (our converter).
Sizes: tiny = the tiny MLLM's LLM (d 128, 4 layers); small = d 512, 8 layers (GQA 8/2, MLP 1536).
Figures: medians over --iters calls after a warm-up (compile) call, which is reported apart.
Writes bench/results/generate_<backend>[_<tag>].json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = {
    "tiny": dict(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384),
    "small": dict(d_model=512, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=64, mlp_dim=1536),
}
GRIDS = ((9, 9), (16, 16))   # 256x256 (spec §1.8)
TEXT_VOCAB, ROWS = 151665, 283047


def _median_s(fn, iters: int, warmup: bool = True):
    """(median seconds over `iters` calls, seconds of the warm-up call or 0, last result)."""
    first = 0.0
    if warmup:
        t = time.perf_counter()
        fn()
        first = time.perf_counter() - t
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), first, out


def build(size: str):
    """(our MLLM, its config) with the official vocabulary layout; the tower is tiny (unused: no images)."""
    from configs import common
    from configs import dualvitok
    from illume_jax.models import mllm
    tok = dualvitok.model_config("tiny")
    tok.update(semantic_codes=32768, pixel_codes=98304)
    cfg = mllm.MLLMConfig.create(common.llm_config(text_vocab_size=TEXT_VOCAB, vocab_size=ROWS, remat="none",
                                                   **SIZES[size]), tok)
    return mllm.create_mllm(cfg), cfg


def torch_model(model, cfg):
    import torch
    import transformers

    from illume_jax.convert import hf_llm
    c = cfg.llm
    hf_cfg = transformers.Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.mlp_dim,
                                      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                                      num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rope_theta=c.rope_theta,
                                      rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
                                      max_position_embeddings=4096)
    hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    params = {k: np.asarray(v) for k, v in hf_llm.flat_params(model.llm).items()}
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hf_llm.params_to_hf(params, c).items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    if c.tie_embeddings:
        hf.tie_weights()
    return hf


def official_style_processor(hf, uncond_ids, vocab, guidance: float):
    """The official InterleavedLogitsProcessor's work per step (spec §4.1), state from row 0."""
    import torch
    from transformers import LogitsProcessor

    from illume_jax.models.mllm import EOL, EOL0, EOL1, EOI, SOL0, SOL1
    s = lambda k: vocab.first_id + k  # noqa: E731
    (h1, w1), (h2, w2) = GRIDS
    V = hf.config.vocab_size
    ids = torch.arange(V)
    l0 = (ids >= vocab.level0_start) & (ids < vocab.level1_start)
    l1 = (ids >= vocab.level1_start) & (ids < vocab.end)

    class Proc(LogitsProcessor):
        def __init__(self):
            self.level, self.tir, self.rows, self.last = None, 0, 0, vocab.soi
            self.past, self.uncond_pos = None, None

        def __call__(self, input_ids, scores):
            t = int(input_ids[0, -1])
            if t in (s(SOL0), s(SOL1)):
                self.level, self.tir, self.rows = (0 if t == s(SOL0) else 1), 0, 0
            elif t in (s(EOL0), s(EOL1)):
                self.level = None
            elif t == s(EOL):
                self.tir, self.rows = 0, self.rows + 1
            elif self.level is not None:
                self.tir += 1
            B = input_ids.shape[0]
            cond = torch.log_softmax(scores.float(), -1)
            # the unconditional branch: its own forward + KV cache (prompt first, then the cond's token)
            if self.past is None:
                feed = uncond_ids.expand(B, -1)
            else:
                feed = input_ids[:, -1:]
            out = hf(input_ids=feed, past_key_values=self.past, use_cache=True)
            self.past = out.past_key_values
            uncond = torch.log_softmax(out.logits[:, -1].float(), -1)
            scores = guidance * (cond - uncond) + uncond
            if self.level == 0:
                allowed = (ids == s(EOL0)) if self.rows == h1 else (ids == s(EOL)) if self.tir == w1 else l0
            elif self.level == 1:
                allowed = (ids == s(EOL1)) if self.rows == h2 else (ids == s(EOL)) if self.tir == w2 else l1
            else:
                nxt = {vocab.soi: s(SOL0), s(EOL0): s(SOL1), s(EOL1): s(EOI)}.get(t, s(EOI))
                allowed = ids == nxt
            return scores.masked_fill(~allowed[None], -float("inf"))

    return Proc()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--tag", default="", help="results file suffix: generate_<backend>_<tag>.json")
    ap.add_argument("--compare-scan", action="store_true",
                    help="also time generate(unstack_layers=False): the scan over stacked layers")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from illume_jax.infer import interleaved as il
    from illume_jax.models import mllm
    rows = []
    n_new = mllm.block_length(GRIDS) - 1
    rng = np.random.default_rng(0)
    for size in args.sizes.split(","):
        model, cfg = build(size)
        v = cfg.vocab
        hf = torch_model(model, cfg) if not args.no_torch else None
        for batch in [int(b) for b in args.batch.split(",")]:
            tags = [v.height_tag(256), v.width_tag(256), v.soi]
            cond = np.concatenate([rng.integers(10, 150000, 24), tags]).astype(np.int32)
            uncond = np.concatenate([rng.integers(10, 150000, 12), tags]).astype(np.int32)
            P = len(cond)
            pad = lambda a: np.concatenate([np.zeros(P - len(a), np.int32), a])  # noqa: E731
            toks = np.stack([cond] * batch + [pad(uncond)] * batch)
            mask = np.stack([np.ones(P, np.int32)] * batch + [pad(np.ones(len(uncond), np.int32))] * batch)
            zeros = np.zeros_like(toks)
            prompts = il.Prompts(jnp.asarray(toks), jnp.asarray(mask), jnp.asarray(zeros), jnp.asarray(zeros), None)
            state = il.RowState.start(np.tile([9, 9, 16, 16], (batch, 1)), True, True, phase=il.EXPECT_SOL0)
            sampling = il.Sampling(temperature=(1.0,) * 3, top_k=(2048,) * 3, guidance_scale=args.guidance)
            key = [0]

            def run_jax(unstack_layers=None):
                key[0] += 1
                out, _ = il.generate(model, prompts, state, jax.random.key(key[0]), vocab=v, sampling=sampling,
                                     max_new_tokens=n_new, eos_id=151645, unstack_layers=unstack_layers)
                return np.asarray(out)

            t_jax, first, out = _median_s(run_jax, args.iters)
            for r in out:  # every row is a well-formed block
                mllm.parse_block(np.concatenate([[v.soi], r]), GRIDS, v)
            row = dict(size=size, batch=batch, new_tokens=n_new, guidance=args.guidance,
                       params_m=round(cfg.llm.num_params() / 1e6, 1),
                       jax_tokens_per_s=batch * n_new / t_jax, jax_images_per_s=batch / t_jax, jax_s=t_jax,
                       jax_compile_s=first - t_jax)
            if args.compare_scan:
                t_scan, _, _ = _median_s(lambda: run_jax(False), args.iters)
                row.update(jax_scan_tokens_per_s=batch * n_new / t_scan, unstacked_vs_scan=t_scan / t_jax)
            if hf is not None:
                import torch
                from transformers import LogitsProcessorList

                def run_torch():
                    proc = official_style_processor(hf, torch.from_numpy(uncond[None].astype(np.int64)), v,
                                                    args.guidance)
                    with torch.inference_mode():
                        return hf.generate(torch.from_numpy(np.stack([cond] * batch).astype(np.int64)),
                                           attention_mask=torch.ones(batch, P, dtype=torch.long),
                                           logits_processor=LogitsProcessorList([proc]), do_sample=True, top_k=2048,
                                           temperature=1.0, top_p=1.0, max_new_tokens=n_new, min_new_tokens=n_new,
                                           pad_token_id=0, eos_token_id=None)

                # No compile to exclude: every call is timed (eager PyTorch).
                t_torch, _, gen = _median_s(run_torch, max(1, args.iters - 1), warmup=False)
                gen = gen[:, P:].numpy()
                for r in gen:
                    mllm.parse_block(np.concatenate([[v.soi], r]), GRIDS, v)
                row.update(torch_tokens_per_s=batch * n_new / t_torch, torch_images_per_s=batch / t_torch,
                           torch_s=t_torch, speedup=t_torch / t_jax)
            print(json.dumps(row), flush=True)
            rows.append(row)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    path = os.path.join(ROOT, "bench", "results", f"generate_{jax.default_backend()}{'_' + args.tag if args.tag else ''}.json")
    meta = dict(device=str(jax.devices()[0]), cpu_count=os.cpu_count())
    if not args.no_torch:
        import torch
        meta["torch_threads"] = torch.get_num_threads()
    with open(path, "w") as f:
        json.dump(dict(meta, rows=rows), f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
