"""Tiny ILLUME+ (or ILLUME) MLLM on ShapeComp level 1: ILLUME's three stages on CPU.

Launch:   python -m illume_jax train-tokenizer --config=configs/dualvitok.py:size=tiny --workdir=runs/dualvitok_tiny
          python -m illume_jax train --config=configs/illume_tiny.py --workdir=runs/illume_tiny
          The original ILLUME's path (family=illume: the semantic VQ's 16x16 codes, one level, a CLIP-style
          ViT through an adapter, the Vicuna template and a LLaMA-style LLM):
          python -m illume_jax train-tokenizer --config=configs/semantic_vq_illume.py:size=tiny --workdir=runs/svq_tiny
          python -m illume_jax train --config=configs/illume_tiny.py:family=illume,tokenizer=runs/svq_tiny \
              --workdir=runs/illume_v1_tiny
Args:     --config=configs/illume_tiny.py:steps=400,batch=16,tokenizer=runs/dualvitok_tiny,levels=1,workers=0,
          family=illume_plus|illume (illume_plus: DualViTok, two code levels, Qwen2-style LLM, 'plain'
          template; illume: see Launch; the options marked "not official" below are ILLUME+ experiments:
          parent_codes and pixel_grid are refused with family=illume, the others are untested on one level),
          size=tiny|small|medium (the LLM's shape, LLM_SIZES below),
          pixel_grid=16|32 (the tokenizer's pixel code grid, as in configs/dualvitok.py: 32 makes 1,134-token
          image blocks, and the sequence lengths follow),
          examples=2000 (training scenes per task),
          lr_scale=1.0 (multiplies every stage's learning rate; wider LLMs want less),
          device=cpu|gpu (cpu: fp32 and the per-example 'cpu' attention kernel; gpu: bfloat16 compute
          over fp32 weights and cuDNN attention),
          stages=0123 (which of the stages below run, by index; e.g. stages=3 trains only SFT, from scratch)
          tower_lr=0 (0: the vision tower stays frozen until SFT, as the official stages 1-2; > 0: `base` and
          `align` train it too, at this multiple of their learning rate -- the tiny ViT has had only a few
          hundred SigLIP steps, where the official one comes from Qwen2-VL's understanding training)
          text_steps=0 (> 0: a first stage 'scene_text' of that many steps, before the stages picked by
          `stages`: the LLM alone learns captions and answers with each image replaced by its scene
          description. It stands in for the official LLM's text pre-training, which already knows how to
          look a named thing up in its context -- a circuit the from-scratch tiny LLM otherwise never
          finds for existence questions; see the README's POPE section)
          text_lr=0 (> 0: the peak learning rate of 'scene_text' itself, whatever lr_scale says; 0: 3e-3 x
          lr_scale. With qa_lookups=1, 3e-4 over 3,000 steps bound colour to shape in text, where 3e-3 did
          not; `base` did not carry it to images: README, "A long, slow scene_text")
          qa_negatives=mixed (how the QA records draw their existence negatives: mixed = one of the three
          POPE ways per scene, as the ShapeComp spec says; random = the data before 2026-12-05, which
          the README's POPE table compares with)
          qa_lookups=0 (1: the QA records ask every object's colour by its shape and shape by its colour,
          the binding POPE's adversarial negatives need; measured in the README's "Through stages 1-3" and
          "A long, slow scene_text")
          base_steps=0 (> 0: `base` runs that many steps instead of steps // 2; the README's POPE-style
          runs give it 1,500 after 1,200 text steps, where steps=400 keeps the later stages short)
          base_text=0 (0 <= f < 1, with text_steps > 0: `base` draws this share of its records from the
          scene-description datasets of 'scene_text', so the route that looks things up in words stays
          trained while the image one forms; README, "The LLM looks shapes up")
          qa_turns=0 (> 0: the image QA records ask at most this many questions each, a scene's questions
          spread over several records; 0: all in one conversation, where earlier answers give the later
          ones away in words. The scene-description QA of 'scene_text' stays whole. With qa_turns > 0
          `base` weights its loss by dataset, as align and sft do: a one-answer record has ~2 label
          tokens against a caption's ~20, and by tokens image QA would get ~1% of the gradient)
          projector_window=1 (odd k > 1: the projector reads each image token's k x k neighbourhood of cells,
          not the cell alone -- not the official projector; one tiny-tower token names an object's colour
          but not its shape: README, "Shape is in no single image token")
          cell_embedding=0 (1: a learned row and column vector per level is added where the model reads
          an image cell and where it draws one -- not in the official model; the tiny LLM otherwise
          knows a drawn code's column at 0.28 (chance 0.06). Its `cell_embed/` trains wherever the
          projector does. Measured: the model then knows the cell at 0.92 and draws no better; README,
          "Told where it draws")
          neighbour_codes=0 (1: where the model draws a code, learned vectors of the codes it drew above that
          cell (above-left, above, above-right) are added -- not in the official model; the tiny generator
          draws object-sized clusters of codes but blob-shaped. Its `neighbour_embed/` trains wherever the
          projector does. README, "Given the codes above")
          parent_codes=0 (1: where the model draws a pixel code, a learned vector of the semantic code it drew
          over that cell is added -- not official; the tiny generator's pixel codes ignore its semantic
          ones. Its `parent_embed/` trains wherever the projector does)
          source_cells=0 (1: where the model draws a code after an image it was shown -- an edit's source,
          a reconstruction's input -- a learned projection of that image's same cell is added; not official:
          the tiny editor draws empty canvases at the official sampling. Its `source_embed/` trains wherever
          the projector does. README, "Edits drawn over their source")
          source_copy=0 (1: there, the logit of the image's own code of the same cell gets a learned bonus, so
          a kept cell is a copy; not official: with the source's cell handed over as a vector the tiny editor
          still pays 2.0 nats per kept object code. Its `source_copy/` trains wherever the projector does.
          README, "A copy path for edits")
          copy_mixture=0 (1, with source_copy=1: the copy is a mixture -- the source's code gets at least a learned
          share g of the probability, whatever the head says -- not a bonus on its logit; not official: with
          the bonus, a drawn edit stops copying once its own codes depart from the source. README, "A copy
          path for edits")
          code_noise=0.0 (> 0: in training, each code fed back as input is replaced by a random code of its
          level with this probability, targets unchanged; not official: the drawn editor follows its own
          wrong background codes instead of the source. README, "A copy path for edits")
          (steps = stage-3 steps; the other stages scale from it)
Hardware: 2 CPU cores. 64x64 images -> 8x8 semantic + 16x16 pixel codes: 350-token image blocks,
          sequences of 512 (understanding, text-to-image) and 768 (editing, reconstruction) tokens.
          pixel_grid=32: 1,134-token blocks, sequences of 1,408 and 2,432 (meant for device=gpu).
Stages (spec §5.2, paper's stage names):
  0 base        stands in for the pretrained LLM the official model starts from: the LLM and the
                projector learn ShapeComp captions and answers (tower frozen).
  1 embed_init  ILLUME stage 1: only the projector and the new vocabulary rows train (the LLM is
                frozen); image reconstruction (the model regenerates the tokens of the image it is
                shown) + captioning.
  2 align       LLM + projector on mixed understanding / text-to-image data.
  3 sft         everything, vision tower included; understanding, text-to-image and editing, with
                10% CFG condition dropout (the official stage-3 value).
Expected: see the README's MLLM section (held-out GenEval-style, POPE-style and editing scores).
"""
import ml_collections as mlc

from configs import common
from configs import dualvitok


# The LLM's shape: tiny is the default of every README figure; small (about 5x the LLM parameters) is the
# sweeps' scale axis (`size=tiny|small`), still CPU-trainable.
LLM_SIZES = {
    "tiny": dict(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384),
    "small": dict(d_model=256, num_layers=6, num_heads=8, num_kv_heads=4, head_dim=32, mlp_dim=768),
    # For an accelerator (device=gpu): about 6x the small LLM's parameters.
    "medium": dict(d_model=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64, mlp_dim=1536),
}
FAMILIES = ("illume_plus", "illume")
DEVICES = {
    "cpu": dict(dtype="float32", attention="cpu"),
    "gpu": dict(dtype="bfloat16", attention="cudnn"),
}


def sequence_lengths(pixel_grid: int, family: str = "illume_plus") -> tuple[int, int]:
    """(one-image, two-image) row lengths: an image block plus the longest text of the ShapeComp
    tasks (a multi-turn QA record: ~160 tokens; an edit instruction: ~60), in multiples of 128.
    family=illume: the semantic VQ's one-level 16x16 block, and ~100 tokens of Vicuna system prompt (92 with
    the tiny text tokenizer, which never saw its words). At 70 the one-image rows were 512 and 44% of the QA
    records did not fit (README, "The original ILLUME's path on ShapeComp")."""
    from illume_jax.models.mllm import block_length  # light import: configs stay cheap to load
    if family == "illume":
        block, system = block_length(((16, 16), (0, 0))), 100
    else:
        block, system = block_length(((8, 8), (pixel_grid, pixel_grid))), 0  # 64² images: 8x8 semantic grid
    up = lambda n: -(-n // 128) * 128  # noqa: E731
    return up(block + 160 + system), up(2 * block + 60 + system)


def _flag(value, name: str) -> bool:
    if str(value) not in ("0", "1"):
        raise ValueError(f"config argument {name}={value!r}: expected 0 or 1")
    return str(value) == "1"


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    a = common.parse_arg(arg, family="illume_plus", steps=400, batch=16, tokenizer="", levels="1", workers=0,
                         vocab=512, size="tiny", stages="0123", pixel_grid=16, examples=2000, device="cpu",
                         lr_scale=1.0, tower_lr=0.0, text_steps=0, qa_negatives="mixed", base_steps=0,
                         qa_lookups=0, text_lr=0.0, base_text=0.0, qa_turns=0,
                         projector_window=1, cell_embedding=0, neighbour_codes=0,
                         parent_codes=0, source_cells=0, source_copy=0, copy_mixture=0, code_noise=0.0)
    if a.size not in LLM_SIZES:
        raise ValueError(f"config argument size={a.size!r}: expected one of {sorted(LLM_SIZES)}")
    if a.device not in DEVICES:
        raise ValueError(f"config argument device={a.device!r}: expected one of {sorted(DEVICES)}")
    if a.family not in FAMILIES:
        raise ValueError(f"config argument family={a.family!r}: expected one of {FAMILIES}")
    illume = a.family == "illume"
    if illume and (int(a.pixel_grid) != 16 or _flag(a.parent_codes, "parent_codes")):
        raise ValueError("config arguments pixel_grid / parent_codes are for family=illume_plus (DualViTok's pixel "
                         "level); family=illume has one level of 16x16 semantic codes")
    c = mlc.ConfigDict()
    c.seed = 0
    c.mesh = common.mesh_config()
    if illume:  # the semantic VQ: 256 codes of a 16x16 grid (configs/semantic_vq_illume.py)
        from configs import semantic_vq_illume
        tok = semantic_vq_illume.model_config("tiny")
        codes = tok.num_codes
    else:
        tok = dualvitok.model_config("tiny", int(a.pixel_grid))  # validates pixel_grid
        codes = tok.semantic_codes + tok.pixel_codes
    # Added ids: 7 structure + 32 resolution tags + the codebooks; padded to a multiple of 64.
    added = 7 + 32 + codes
    rows = -(-(a.vocab + added) // 64) * 64
    # family=illume: LLaMA-style blocks (no qkv bias, RoPE base 10,000), as Vicuna's; the head stays tied to
    # the embedding (Vicuna's is not) so stage 1's new-row updates cover both, as in the ILLUME+ tiny model.
    llama = dict(family="llama", qkv_bias=False, rope_theta=10_000.0) if illume else {}
    c.model = common.llm_config(text_vocab_size=a.vocab, vocab_size=rows, remat="none",
                                **DEVICES[a.device], **LLM_SIZES[a.size], **llama)
    c.vision = common.vision_config(tokenizer_workdir=a.tokenizer or ("runs/svq_tiny" if illume else
                                                                      "runs/dualvitok_tiny"),
                                    tokenizer_model=tok, resolution=64,
                                    max_images=2, projector_window=int(a.projector_window),
                                    cell_embedding=_flag(a.cell_embedding, "cell_embedding"),
                                    neighbour_codes=_flag(a.neighbour_codes, "neighbour_codes"),
                                    parent_codes=_flag(a.parent_codes, "parent_codes"),
                                    source_cells=_flag(a.source_cells, "source_cells"),
                                    source_copy=_flag(a.source_copy, "source_copy"),
                                    copy_mixture=_flag(a.copy_mixture, "copy_mixture"), code_noise=float(a.code_noise),
                                    # ILLUME's up to 9 slices + a global view for images larger than 64²
                                    # (ShapeComp's are all 64²: training rows never slice).
                                    anyres_max_slices=9 if illume else 0)
    c.tokenizer = mlc.ConfigDict(dict(kind="sentencepiece", path="", vocab_size=a.vocab,
                                      chat_template="vicuna" if illume else "plain",
                                      corpus_tasks=("caption", "qa", "edit", "t2i", "recon")))
    levels = tuple(int(ch) for ch in a.levels)
    n = int(a.examples)
    one, two = sequence_lengths(int(a.pixel_grid), a.family)  # 512 / 768 at the default 16x16 grid; illume 640 / 768
    c.data = mlc.ConfigDict(dict(
        datasets={f"shapecomp_{t}": dict(kind="shapecomp", levels=levels, tasks=(t,), num_examples=n)
                  for t in ("caption", "qa", "t2i", "edit", "recon")},
        text_only=False, num_workers=a.workers, shuffle_seed=0, data_dir=""))
    from illume_jax.data.shapecomp import QA_NEGATIVES  # light: numpy only
    if a.qa_negatives not in QA_NEGATIVES:
        raise ValueError(f"config argument qa_negatives={a.qa_negatives!r}: expected one of {QA_NEGATIVES}")
    c.data.datasets.shapecomp_qa.qa_negatives = a.qa_negatives
    if int(a.qa_lookups) not in (0, 1):
        raise ValueError(f"config argument qa_lookups={a.qa_lookups!r}: expected 0 or 1")
    qa_lookups = bool(int(a.qa_lookups))
    c.data.datasets.shapecomp_qa.qa_lookups = qa_lookups
    if int(a.qa_turns) < 0:
        raise ValueError(f"config argument qa_turns={a.qa_turns!r}: expected questions per QA record >= 1, "
                         f"or 0 (all of a scene's in one)")
    qa_turns = int(a.qa_turns)
    c.data.datasets.shapecomp_qa.qa_turns = qa_turns
    s3 = a.steps
    if int(a.base_steps) < 0:
        raise ValueError(f"config argument base_steps={a.base_steps!r}: expected a number of steps >= 0 (0: steps // 2)")
    base_steps = int(a.base_steps) or s3 // 2
    tower_lr = float(a.tower_lr)
    if tower_lr < 0:
        raise ValueError(f"config argument tower_lr={a.tower_lr!r}: expected a learning-rate multiple >= 0")
    # Stages that would otherwise leave the tower frozen (see tower_lr above).
    # Not-official embeddings train with the projector.
    cells = (("cell_embed/.*",) if c.vision.cell_embedding else ()) + \
        (("neighbour_embed/.*",) if c.vision.neighbour_codes else ()) + \
        (("parent_embed/.*",) if c.vision.parent_codes else ()) + \
        (("source_embed/.*",) if c.vision.source_cells else ()) + \
        (("source_copy/.*",) if c.vision.source_copy else ())
    understand = (dict(trainable=("llm/.*", "projector/.*", "vision/.*", *cells),
                       lr_multipliers=(("vision/.*", tower_lr),))
                  if tower_lr > 0 else dict(trainable=("llm/.*", "projector/.*", *cells)))
    base_text = float(a.base_text)
    if not 0 <= base_text < 1 or (base_text > 0 and (int(a.text_steps) <= 0 or "0" not in a.stages)):
        raise ValueError(f"config argument base_text={a.base_text!r}: expected a share 0 <= f < 1 of `base`'s "
                         f"records, > 0 only with a 'scene_text' stage (text_steps > 0; got {a.text_steps!r}) "
                         f"and `base` among the stages (stages={a.stages!r})")
    base_mixture = {"shapecomp_caption": 0.5 * (1 - base_text), "shapecomp_qa": 0.5 * (1 - base_text)}
    if base_text > 0:  # in scene_text's own proportions (below)
        base_mixture.update(shapecomp_caption_text=0.3 * base_text, shapecomp_qa_text=0.7 * base_text)
    stage = lambda name, steps, seq, lr, **kw: common.stage_config(  # noqa: E731
        name, steps=max(int(steps), 1), seq_len=seq, global_batch_size=a.batch, lr=lr * float(a.lr_scale), **kw)
    c.stages = [
        stage("base", base_steps, one, lr=3e-3, warmup_steps=20, **understand,
              mixture=base_mixture, loss_weighting="dataset" if qa_turns else "token"),
        stage("embed_init", s3 // 4, two, lr=3e-3, warmup_steps=10,
              trainable=("projector/.*", "llm/embed/embedding", *cells), new_vocab_only=True,
              mixture={"shapecomp_recon": 0.5, "shapecomp_caption": 0.5}),
        # align and sft weight the loss by dataset: by tokens, a text-to-image record's ~350 image
        # tokens outweigh a caption's or answer's few, and understanding got 3% of align's gradient
        # (README, "Through stages 1-3": POPE-style 0.72 -> 0.83 at the end of sft).
        stage("align", s3, one, lr=2e-3, warmup_steps=20, **understand, loss_weighting="dataset",
              mixture={"shapecomp_caption": 0.2, "shapecomp_qa": 0.3, "shapecomp_t2i": 0.5}),
        # sft's editing rows are a task no earlier stage trained (their loss opens at 6-7 nats,
        # text-to-image at ~1.8). With a 20-step warmup the peak LR met that transient (a logged
        # rerun: caption loss 0.75 -> 2.85 nats in 20 steps) and the POPE-style score ended at 0.49;
        # ramping over a quarter of the stage: caption peak 1.27, POPE-style 0.72, the same final
        # image loss (README, "Through stages 1-3").
        stage("sft", s3, two, lr=1e-3, warmup_steps=s3 // 4, trainable=(".*",), loss_weighting="dataset",
              lr_multipliers=(("vision/.*", 0.1),), cfg_dropout=0.1,
              mixture={"shapecomp_caption": 0.1, "shapecomp_qa": 0.3, "shapecomp_t2i": 0.35,
                       "shapecomp_edit": 0.25}),
    ]
    picked = sorted(set(a.stages))
    if not picked or any(ch not in "0123" for ch in picked):
        raise ValueError(f"config argument stages={a.stages!r}: expected digits from 0123 (stage indices)")
    c.stages = [c.stages[int(ch)] for ch in picked]
    if float(a.text_lr) < 0 or (float(a.text_lr) > 0 and int(a.text_steps) <= 0):
        raise ValueError(f"config argument text_lr={a.text_lr!r}: expected a learning rate > 0 for a 'scene_text' "
                         f"stage (text_steps > 0; got {a.text_steps!r}), or 0 (3e-3 x lr_scale)")
    if int(a.text_steps) > 0:
        for t in ("caption", "qa"):  # the same built records as the image datasets, read as text
            c.data.datasets[f"shapecomp_{t}_text"] = dict(kind="shapecomp", levels=levels, tasks=(t,), num_examples=n,
                                                         text_only=True, qa_negatives=a.qa_negatives,
                                                         qa_lookups=qa_lookups)
        # Rows: a scene description (~40 tokens) + the longest QA record (~160).
        c.stages.insert(0, stage("scene_text", int(a.text_steps), 256, lr=3e-3, warmup_steps=20,
                                 trainable=("llm/.*",),
                                 mixture={"shapecomp_caption_text": 0.3, "shapecomp_qa_text": 0.7}))
        if float(a.text_lr) > 0:
            c.stages[0].lr = float(a.text_lr)
    elif int(a.text_steps) < 0:
        raise ValueError(f"config argument text_steps={a.text_steps!r}: expected a number of steps >= 0")
    # One self-enhancement round on top of the trained model (python -m illume_jax self-enhance).
    c.self_enhance = common.self_enhance_config(level=levels[-1])
    if len(c.stages) == 1:  # no stage before the last to start the round from
        c.self_enhance.from_stage = "latest"
    c.model_init = common.model_init_config()
    c.optim = common.optim_config()
    c.checkpoint = common.checkpoint_config(every_steps=50)
    c.log_every = 10
    return c
