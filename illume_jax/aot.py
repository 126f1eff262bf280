"""Ahead-of-time compilation of the train step for a TPU topology, on a CPU host.

`python -m illume_jax aot --config=configs/illume_plus_7b.py --topology=v5p:4x4x4`

libtpu (the `tpu` extra) describes the devices of a named topology
(`jax.experimental.topologies.get_topology_desc`), so the real train step — the same
function, shardings and donation as in training — can be lowered and compiled for a pod
this machine does not have. The compiled program's `memory_analysis()` gives the per-chip
HBM it needs (arguments, temporaries, outputs), `cost_analysis()` XLA's FLOP count.
XLA counts a `while` loop body once, so with scanned layers its FLOPs cover one layer;
the analytic model FLOPs (6·N·tokens + causal attention) are printed beside it.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax

from illume_jax import sharding
from illume_jax.models.llm import LLMConfig

# Per-chip HBM by TPU generation (GiB), for the "fits" verdict.
HBM_GIB = {"v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}


def _fits(report) -> bool | None:
    return None if report.hbm_gib is None else report.peak_gib <= report.hbm_gib


def _memory_lines(report) -> list[str]:
    """The per-chip memory lines of a compiled program's report (arguments, temporaries,
    outputs, donated, peak against the chip's HBM)."""
    fits = _fits(report)
    verdict = "unknown HBM size" if fits is None else ("fits" if fits else "DOES NOT FIT")
    return [f"per-chip memory: arguments {report.argument_gib:.2f} GiB, temporaries {report.temp_gib:.2f} GiB, "
            f"outputs {report.output_gib:.2f} GiB (donated/aliased {report.alias_gib:.2f} GiB)",
            f"peak per chip ~{report.peak_gib:.2f} GiB of {report.hbm_gib or '?'} GiB HBM: {verdict}"]


@dataclasses.dataclass
class AotReport:
    topology: str
    num_devices: int
    mesh: dict
    stage: str
    seq_len: int
    global_batch_size: int
    argument_gib: float
    temp_gib: float
    output_gib: float
    alias_gib: float
    peak_gib: float
    hbm_gib: float | None
    xla_flops: float
    model_flops_per_step: float
    compile_s: float
    params: int = 0            # every parameter of the model (an MLLM's tower and projectors included)
    trained_params: int = 0    # those in the stage's optimizer (its `trainable` patterns)

    @property
    def fits(self) -> bool | None:
        return _fits(self)

    def table(self) -> str:
        return "\n".join([
            f"topology {self.topology}: {self.num_devices} chips, mesh {self.mesh}",
            f"stage {self.stage!r}: global batch {self.global_batch_size} x seq {self.seq_len}; parameters "
            f"{self.params / 1e9:.3f} B, {self.trained_params / 1e9:.3f} B of them in the stage's optimizer",
            *_memory_lines(self),
            f"FLOPs per step: model {self.model_flops_per_step:.3e} (all chips; "
            f"{self.model_flops_per_step / self.num_devices:.3e} per chip), "
            f"XLA cost analysis {self.xla_flops:.3e} per chip (scan body counted once)",
            f"compile time {self.compile_s:.1f} s",
        ])


def model_flops_per_token(cfg: LLMConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params (head included, lookup excluded) + causal attention."""
    matmul_params = cfg.num_params() - cfg.vocab_size * cfg.d_model * (0 if cfg.tie_embeddings else 1)
    attention = 6 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len / 2 * 2
    return 6 * matmul_params + attention


def topology_devices(topology: str) -> list:
    from jax.experimental import topologies
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # libtpu missing, busy, or an unknown name
        if "lockfile" in str(e):  # libtpu serves one process per host, AOT compiles included
            raise RuntimeError(f"--topology={topology!r}: libtpu is in use by another process on this host "
                               "(one at a time, even for ahead-of-time compiles); wait for it to finish") from e
        raise ValueError(f"--topology={topology!r}: cannot describe it ({e}). Install the `tpu` extra "
                         f"(pip install -e '.[tpu]') and use names like v5p:2x2x1, v5p:4x4x4, v6e:2x2") from e
    return list(desc.devices)


def compile_train_step(config: Any, topology: str, stage_index: int = -1) -> AotReport:
    from illume_jax.train import step as step_lib

    # A multimodal config (config.vision) compiles the whole step: vision tower, projector, LLM and the frozen
    # vision tokenizer that fills the code slots (its shapes from vision.tokenizer_model). Model FLOPs count
    # the LLM only.
    cfg = LLMConfig.from_config(config.model)
    stages = list(config.stages)
    if stage_index < 0:
        stage_index = max(range(len(stages)), key=lambda i: (stages[i].seq_len * stages[i].global_batch_size, i))
    if stage_index >= len(stages):
        raise ValueError(f"--stage={stage_index}: the config has {len(stages)} stages")
    stage = stages[stage_index]
    devices = topology_devices(topology)
    mesh = sharding.make_mesh(dict(config.mesh), devices=devices)
    from illume_jax.train import optim, state as state_lib
    trained, params = optim.parameter_counts(state_lib.abstract_state(config, stage_index, mesh)[2].params, stage)
    t0 = time.time()
    lowered = step_lib.lower_train_step(config, stage_index, mesh)
    compiled = lowered.compile()
    compile_s = time.time() - t0
    mem, cost = _analyses(compiled)
    gib = 1024 ** 3
    arg, temp, out = mem.argument_size_in_bytes / gib, mem.temp_size_in_bytes / gib, mem.output_size_in_bytes / gib
    alias = mem.alias_size_in_bytes / gib
    kind = topology.split(":")[0]
    tokens = stage.seq_len * stage.global_batch_size
    return AotReport(
        topology=topology, num_devices=len(devices), mesh=dict(mesh.shape), stage=stage.name,
        seq_len=stage.seq_len, global_batch_size=stage.global_batch_size, argument_gib=arg, temp_gib=temp,
        output_gib=out, alias_gib=alias, peak_gib=arg + temp + out - alias, hbm_gib=HBM_GIB.get(kind),
        xla_flops=float(cost.get("flops", 0.0)), model_flops_per_step=model_flops_per_token(cfg, stage.seq_len) * tokens,
        compile_s=compile_s, params=params, trained_params=trained)


def main(config: Any, topology: str, stage_index: int = -1, what: str = "train", batch: int = 8,
         cache_len: int = 0) -> AotReport | "DecodeAotReport":
    if what == "decode":
        report = compile_decode_step(config, topology, batch=batch, cache_len=cache_len)
    elif what == "train":
        report = compile_train_step(config, topology, stage_index)
    else:
        raise ValueError(f"--what={what!r}: expected 'train' or 'decode'")
    print(report.table())
    return report


@dataclasses.dataclass
class DecodeAotReport:
    topology: str
    num_devices: int
    mesh: dict
    batch: int
    rows: int
    cache_len: int
    argument_gib: float
    temp_gib: float
    output_gib: float
    alias_gib: float
    peak_gib: float
    hbm_gib: float | None
    cache_gib: float
    xla_flops: float
    compile_s: float
    cell_embedding: bool = False
    neighbour_codes: bool = False
    parent_codes: bool = False
    source_cells: bool = False
    source_copy: bool = False
    layout: str = "ILLUME+ 512x512: 18x18 semantic + 32x32 pixel codes"

    @property
    def fits(self) -> bool | None:
        return _fits(self)

    def table(self) -> str:
        return "\n".join([
            f"topology {self.topology}: {self.num_devices} chips, mesh {self.mesh}; image layout {self.layout}",
            f"decode step (sample + one token, CFG{', cell embedding' if self.cell_embedding else ''}"
            f"{', neighbour codes' if self.neighbour_codes else ''}{', parent codes' if self.parent_codes else ''}"
            f"{', source cells' if self.source_cells else ''}{', source copy' if self.source_copy else ''}): "
            f"{self.batch} images = {self.rows} rows, "
            f"KV cache {self.cache_len} slots ({self.cache_gib:.2f} GiB in all)",
            *_memory_lines(self),
            f"XLA FLOPs per chip {self.xla_flops:.3e}; compile time {self.compile_s:.1f} s",
        ])


def compile_decode_step(config: Any, topology: str, *, batch: int = 8, cache_len: int = 0) -> DecodeAotReport:
    """Lowers and compiles one step of the MLLM's generation loop (`infer.interleaved.decode_step`:
    windowed head + CFG + masks + sampling, then one token through the model with the KV cache
    donated) for a TPU topology, at the 512x512 ILLUME+ layout by default (cache = prompt 64 +
    the 1,404-token block), `batch` images with CFG (2 x batch rows). With `vision.cell_embedding`
    the fed tokens carry their cell's vectors, with `vision.neighbour_codes` the codes drawn above
    their cell and with `vision.parent_codes` the semantic code over it (the row state then holds a code
    buffer), with `vision.source_cells` the source image's same cell (a projected buffer of the block's
    cells per row, an argument), as `generate` feeds them; with `vision.source_copy` the sampled logits
    take the copy bonus at the source's code (a buffer of the block's source codes per row, an argument)."""
    import jax.numpy as jnp
    from flax import nnx

    from illume_jax.infer import interleaved as il
    from illume_jax.models.mllm import block_length
    cfg = LLMConfig.from_config(config.model)
    vocab, grids, layout = _decode_layout(config, cfg)
    cache_len = cache_len or 64 + block_length(grids)
    devices = topology_devices(topology)
    mesh = sharding.make_mesh(dict(config.mesh), devices=devices)
    from illume_jax.train.state import abstract_model
    graphdef, abs_params = abstract_model(cfg, mesh)
    with sharding.use_mesh(mesh):
        psh = nnx.get_named_sharding(abs_params, mesh)
    abs_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_params, psh)
    cell_graph, abs_cells = _abstract_extra_embedding(config, cfg, mesh, "cell_embedding", vocab)
    nb_graph, abs_nb = _abstract_extra_embedding(config, cfg, mesh, "neighbour_codes", vocab)
    parent_graph, abs_parent = _abstract_extra_embedding(config, cfg, mesh, "parent_codes", vocab)
    copy_graph, abs_copy = _abstract_extra_embedding(config, cfg, mesh, "source_copy", vocab)
    R = 2 * batch
    if copy_graph is not None or nb_graph is not None or config.get("vision", {}).get("source_cells", False):
        if grids[1] == (0, 0):
            raise ValueError("aot --what=decode: the not-official copy / neighbour / source-cell options are "
                             "compiled for ILLUME+ layouts only")
    cache_shape = (cfg.num_layers, R, cache_len, cfg.num_kv_heads, cfg.head_dim)
    from jax.sharding import NamedSharding, PartitionSpec as P
    kv_sh = NamedSharding(mesh, P(None, ("data", "fsdp"), None, "tensor", None))
    rows_sh = sharding.batch_sharding(mesh, 2)
    repl = NamedSharding(mesh, P())
    from illume_jax.models.llm import KVCache
    abs_cache = KVCache(k=jax.ShapeDtypeStruct(cache_shape, cfg.compute_dtype, sharding=kv_sh),
                        v=jax.ShapeDtypeStruct(cache_shape, cfg.compute_dtype, sharding=kv_sh),
                        segment_ids=jax.ShapeDtypeStruct((R, cache_len), jnp.int32, sharding=rows_sh),
                        index=jax.ShapeDtypeStruct((), jnp.int32, sharding=repl))
    vec = lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype, sharding=repl)  # noqa: E731
    abs_state = il.RowState(phase=vec((batch,)), col=vec((batch,)), row=vec((batch,)), grids=vec((batch, 4)),
                            may_image=vec((batch,), bool), stop_at_eoi=vec((batch,), bool),
                            codes=None if nb_graph is None and parent_graph is None else vec((batch, 2, cache_len)))
    hidden = jax.ShapeDtypeStruct((R, cfg.d_model), cfg.compute_dtype, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
    sampling = il.Sampling.for_task("t2i")
    source = None
    if config.get("vision") is not None and config.vision.get("source_cells", False):
        source = il.SourceCells(feats=jax.ShapeDtypeStruct((R, 2, block_length(grids), cfg.d_model), cfg.compute_dtype,
                                                           sharding=sharding.batch_sharding(mesh, 4)),
                                grids=jax.ShapeDtypeStruct((R, 4), jnp.int32, sharding=rows_sh))
    source_codes = None
    if copy_graph is not None:
        source_codes = il.SourceCells(feats=jax.ShapeDtypeStruct((R, 2, block_length(grids), 1), jnp.int32,
                                                                 sharding=sharding.batch_sharding(mesh, 4)),
                                      grids=jax.ShapeDtypeStruct((R, 4), jnp.int32, sharding=rows_sh))

    def step(params, cell_params, nb_params, parent_params, copy_params, source, source_codes, hidden, state,
             positions, cache, key):
        llm = nnx.merge(graphdef, params)
        extra = lambda graph, p: None if graph is None else nnx.merge(graph, p)  # noqa: E731
        copy_from = None if copy_graph is None else (nnx.merge(copy_graph, copy_params), source_codes)
        return il.decode_step(llm, hidden, state, positions, cache, jax.random.wrap_key_data(key),
                              vocab=vocab, sampling=sampling, eos_id=151645, cell_embed=extra(cell_graph, cell_params),
                              neighbour_embed=extra(nb_graph, nb_params),
                              parent_embed=extra(parent_graph, parent_params), source=source, copy_from=copy_from)

    t0 = time.time()
    with sharding.use_mesh(mesh):
        lowered = jax.jit(step, donate_argnums=(10,)).lower(abs_params, abs_cells, abs_nb, abs_parent, abs_copy, source,
                                                            source_codes, hidden, abs_state, vec((R,)), abs_cache,
                                                            vec((2,), jnp.uint32))
    compiled = lowered.compile()
    compile_s = time.time() - t0
    mem, cost = _analyses(compiled)
    gib = 1024 ** 3
    arg, temp, out = mem.argument_size_in_bytes / gib, mem.temp_size_in_bytes / gib, mem.output_size_in_bytes / gib
    alias = mem.alias_size_in_bytes / gib
    cache_gib = 2 * math_prod(cache_shape) * jnp.dtype(cfg.compute_dtype).itemsize / gib
    return DecodeAotReport(topology=topology, num_devices=len(devices), mesh=dict(mesh.shape), batch=batch, rows=R,
                           cache_len=cache_len, argument_gib=arg, temp_gib=temp, output_gib=out, alias_gib=alias,
                           peak_gib=arg + temp + out - alias, hbm_gib=HBM_GIB.get(topology.split(":")[0]),
                           cache_gib=cache_gib, xla_flops=float(cost.get("flops", 0.0)), compile_s=compile_s,
                           cell_embedding=cell_graph is not None, neighbour_codes=nb_graph is not None,
                           parent_codes=parent_graph is not None, source_cells=source is not None,
                           source_copy=copy_graph is not None, layout=layout)


def _decode_layout(config: Any, cfg: LLMConfig):
    """(image vocabulary, block grids, description) the decode step is compiled for: the original ILLUME's
    one-level block of its semantic VQ's grid when the config's vision tokenizer is one (configs/illume_7b.py),
    else ILLUME+'s 512x512 block with the official 32,768 + 98,304 codes."""
    from illume_jax.models.mllm import ImageVocab
    if config.get("vision") is not None:
        from illume_jax.train.state import model_config
        mcfg = model_config(config)
        if mcfg.levels == 1:
            grids = mcfg.grids(mcfg.tokenizer.image_size, mcfg.tokenizer.image_size)
            g = grids[0][0]
            return mcfg.vocab, grids, f"ILLUME one level: {g}x{g} codes of {mcfg.vocab.semantic_codes}"
    vocab = ImageVocab(first_id=cfg.text_vocab_size)
    if vocab.end > cfg.vocab_size:
        raise ValueError(f"config.model.vocab_size={cfg.vocab_size} has no room for the ILLUME+ image vocabulary "
                         f"(needs {vocab.end}): the decode step is compiled for ILLUME+ configs")
    return vocab, ((18, 18), (32, 32)), "ILLUME+ 512x512: 18x18 semantic + 32x32 pixel codes"


def _abstract_extra_embedding(config: Any, llm_cfg: LLMConfig, mesh, option: str, vocab):
    """(graphdef, sharded abstract params) of the MLLM's not-official input embedding that
    `vision.<option>` turns on -- `CellEmbedding` (cell_embedding; its table side follows the
    tokenizer's grids at `vision.max_side`), `NeighbourCodeEmbedding` (neighbour_codes) or
    `ParentCodeEmbedding` (parent_codes), these two with a row per code of the step's image vocabulary
    `vocab`, or the `SourceCodeCopy` (source_copy) -- else (None, None)."""
    vision = config.get("vision")
    if vision is None or not vision.get(option, False):
        return None, None
    from flax import nnx

    from illume_jax.models.mllm import CellEmbedding, NeighbourCodeEmbedding, ParentCodeEmbedding, SourceCodeCopy
    from illume_jax.train.state import model_config
    mcfg = model_config(config)
    kw = dict(dtype=llm_cfg.compute_dtype, param_dtype=llm_cfg.weight_dtype)  # (Rngs made inside the trace)
    make = {"cell_embedding": lambda: CellEmbedding(mcfg.cell_table_side, llm_cfg.d_model, rngs=nnx.Rngs(0), **kw),
            "neighbour_codes": lambda: NeighbourCodeEmbedding(vocab.semantic_codes, vocab.pixel_codes, llm_cfg.d_model,
                                                              rngs=nnx.Rngs(0), **kw),
            "parent_codes": lambda: ParentCodeEmbedding(vocab.semantic_codes, llm_cfg.d_model,
                                                        pixel_stride=mcfg.tokenizer.downsample,
                                                        semantic_stride=mcfg.tokenizer.semantic_factor,
                                                        rngs=nnx.Rngs(0), **kw),
            "source_copy": lambda: SourceCodeCopy(llm_cfg.d_model, param_dtype=llm_cfg.weight_dtype,
                                                  rngs=nnx.Rngs(0), mixture=mcfg.copy_mixture)}[option]
    with sharding.use_mesh(mesh):
        module = nnx.eval_shape(make)
        graph, params = nnx.split(module, nnx.Param)
        shardings = nnx.get_named_sharding(params, mesh)
    return graph, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings)


def math_prod(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def _analyses(compiled):
    """(memory analysis, cost-analysis dict) of a compiled program (cost comes as a list on some versions)."""
    cost = compiled.cost_analysis()
    return compiled.memory_analysis(), cost[0] if isinstance(cost, (list, tuple)) else cost


@dataclasses.dataclass
class TokenizerAotReport:
    topology: str
    num_devices: int
    mesh: dict
    kind: str
    batch: int
    resolution: int
    code_grids: dict
    argument_gib: float
    temp_gib: float
    output_gib: float
    peak_gib: float
    hbm_gib: float | None
    xla_flops: float
    compile_s: float

    def table(self) -> str:
        fits = "unknown HBM size" if self.hbm_gib is None else (
            "fits" if self.peak_gib <= self.hbm_gib else "DOES NOT FIT")
        return "\n".join([
            f"topology {self.topology}: {self.num_devices} chips, mesh {self.mesh}",
            f"{self.kind} encode: batch {self.batch} x {self.resolution}x{self.resolution} -> codes {self.code_grids}",
            f"per-chip memory: arguments {self.argument_gib:.2f} GiB, temporaries {self.temp_gib:.2f} GiB, "
            f"outputs {self.output_gib:.3f} GiB; peak ~{self.peak_gib:.2f} GiB of {self.hbm_gib or '?'} GiB: {fits}",
            f"XLA FLOPs per chip {self.xla_flops:.3e} (scan bodies counted once); compile time {self.compile_s:.1f} s",
        ])


def compile_tokenizer_encode(config: Any, topology: str, resolution: int = 0, batch: int = 0) -> TokenizerAotReport:
    """Lowers and compiles the tokenizer's `encode` (images -> codes) for a TPU topology: the
    parameters sharded by the logical rules, the image batch over (data, fsdp)."""
    from flax import nnx

    from illume_jax.train.tokenizer import make_model
    devices = topology_devices(topology)
    mesh = sharding.make_mesh(dict(config.mesh), devices=devices)
    resolution = resolution or (512 if config.model.kind == "dualvitok" else int(config.data.resolution))
    batch = batch or int(config.train.batch_size)
    with sharding.use_mesh(mesh):
        abstract_model = nnx.eval_shape(lambda: make_model(config.model, nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract_model)
        state_sh = nnx.get_named_sharding(state, mesh)
    abs_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, state_sh)
    images = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jax.numpy.float32,
                                  sharding=sharding.batch_sharding(mesh, 4))

    def encode(st, x):
        model = nnx.merge(graphdef, st)
        out = model.encode(x)
        return out if isinstance(out, tuple) else (out,)

    t0 = time.time()
    with sharding.use_mesh(mesh):
        lowered = jax.jit(encode).lower(abs_state, images)
    compiled = lowered.compile()
    compile_s = time.time() - t0
    mem, cost = _analyses(compiled)
    gib = 1024 ** 3
    arg, temp, out = mem.argument_size_in_bytes / gib, mem.temp_size_in_bytes / gib, mem.output_size_in_bytes / gib
    grids = [tuple(o.shape[1:]) for o in jax.tree.leaves(lowered.out_info)]
    return TokenizerAotReport(
        topology=topology, num_devices=len(devices), mesh=dict(mesh.shape), kind=config.model.kind, batch=batch,
        resolution=resolution, code_grids={"semantic": grids[0], **({"pixel": grids[1]} if len(grids) > 1 else {})},
        argument_gib=arg, temp_gib=temp, output_gib=out, peak_gib=arg + temp + out,
        hbm_gib=HBM_GIB.get(topology.split(":")[0]), xla_flops=float(cost.get("flops", 0.0)), compile_s=compile_s)


def main_tokenizer(config: Any, topology: str, resolution: int = 0) -> TokenizerAotReport:
    report = compile_tokenizer_encode(config, topology, resolution)
    print(report.table())
    return report


@dataclasses.dataclass
class DecoderAotReport:
    topology: str
    num_devices: int
    mesh: dict
    conditioning: str
    batch: int
    resolution: int        # output image side
    latent: tuple
    unet_params: int
    argument_gib: float
    temp_gib: float
    output_gib: float
    alias_gib: float
    peak_gib: float
    hbm_gib: float | None
    xla_flops: float
    compile_s: float

    def table(self) -> str:
        return "\n".join([
            f"topology {self.topology}: {self.num_devices} chips, mesh {self.mesh}",
            f"{self.conditioning} decoder UNet train step: batch {self.batch} x {self.resolution}^2 outputs "
            f"(latents {self.latent}), UNet {self.unet_params / 1e9:.3f} B parameters",
            *_memory_lines(self),
            f"XLA FLOPs per chip {self.xla_flops:.3e}; compile time {self.compile_s:.1f} s",
        ])


def compile_decoder_step(config: Any, topology: str, resolution: int = 0, batch: int = 0) -> DecoderAotReport:
    """Lowers and compiles the diffusion decoder's real UNet training step (the function, shardings
    and donation `train-decoder` uses; the frozen tokenizer's features come in as an input) for a
    TPU topology. `resolution`: token-image side (0 = config.data.resolution; outputs are 2x)."""
    import math

    import jax.numpy as jnp

    from illume_jax.train.decoder import DecoderTrainer
    devices = topology_devices(topology)
    mesh = sharding.make_mesh(dict(config.mesh), devices=devices)
    res = resolution or int(config.data.resolution)
    batch = batch or int(config.train.batch_size)
    trainer = DecoderTrainer(config, "/nonexistent-aot-workdir", mesh, "unet")
    cfg = trainer.cfg
    out_res = res * cfg.scale
    latent = cfg.latent_shape(batch, (out_res, out_res))
    bsh = lambda nd: sharding.batch_sharding(mesh, nd)  # noqa: E731
    batch_abs = {"target": jax.ShapeDtypeStruct((batch, out_res, out_res, 3), jnp.float32, sharding=bsh(4))}
    if cfg.kind == "illume_plus":
        from illume_jax.models.dualvitok import DualViTokConfig, token_grids
        _, (h, w) = token_grids(res, res, DualViTokConfig.from_config(config.tokenizer.model))
        feats = jax.ShapeDtypeStruct((batch, h, w, cfg.code_channels), jnp.float32, sharding=bsh(4))
    else:
        from illume_jax.models.semantic_vq import SemanticVQConfig
        tcfg = SemanticVQConfig.from_config(config.tokenizer.model)
        feats = jax.ShapeDtypeStruct((batch, tcfg.grid ** 2, cfg.unet.cross_attention_dim), jnp.float32,
                                     sharding=bsh(3))
    t0 = time.time()
    lowered = trainer._step.lower(trainer.abstract, batch_abs, feats)
    compiled = lowered.compile()
    compile_s = time.time() - t0
    mem, cost = _analyses(compiled)
    gib = 1024 ** 3
    arg, temp, out = mem.argument_size_in_bytes / gib, mem.temp_size_in_bytes / gib, mem.output_size_in_bytes / gib
    alias = mem.alias_size_in_bytes / gib
    unet_params = sum(math.prod(x.shape) for x in jax.tree.leaves(trainer.abstract.params["unet"]))
    return DecoderAotReport(
        topology=topology, num_devices=len(devices), mesh=dict(mesh.shape), conditioning=cfg.kind, batch=batch,
        resolution=out_res, latent=latent, unet_params=unet_params, argument_gib=arg, temp_gib=temp, output_gib=out,
        alias_gib=alias, peak_gib=arg + temp + out - alias, hbm_gib=HBM_GIB.get(topology.split(":")[0]),
        xla_flops=float(cost.get("flops", 0.0)), compile_s=compile_s)


def main_decoder(config: Any, topology: str, resolution: int = 0) -> DecoderAotReport:
    report = compile_decoder_step(config, topology, resolution)
    print(report.table())
    return report
