"""Text tokenizers behind one small interface.

- sentencepiece, trained on the experiment's own text (ShapeComp for the tiny configs) and
  cached in `<workdir>/tokenizer/`; the chat-template markers are user-defined pieces, so
  each encodes to one id;
- HF `tokenizer.json` (Qwen2.5 / LLaMA vocabularies), via the `tokenizers` library.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Iterable, Protocol, Sequence

import sentencepiece as spm

# Markers the chat templates use; they must be single ids in every vocabulary we train.
SPECIAL_PIECES = ("<image>", "<|user|>", "<|assistant|>", "<|im_start|>", "<|im_end|>")


class TextTokenizer(Protocol):
    """encode / decode / ids of the special tokens."""

    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_to_id(self, piece: str) -> int | None: ...


class SentencePieceTokenizer:
    def __init__(self, model_proto: bytes):
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def token_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i


class HFTokenizer:
    """A `tokenizer.json` (e.g. Qwen2.5's: pad <|endoftext|>, eos <|im_end|>)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer
        if not os.path.exists(path):
            raise ValueError(f"config.tokenizer.path={path!r}: no such tokenizer.json")
        self.tok = Tokenizer.from_file(path)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        find = lambda *names: next((self.tok.token_to_id(n) for n in names if self.tok.token_to_id(n) is not None),
                                   None)
        self.eos_id = find("<|im_end|>", "</s>", "<|endoftext|>", "<eos>")
        self.pad_id = find("<|endoftext|>", "<pad>", "<unk>", "</s>")
        self.bos_id = find("<s>", "<bos>")
        if self.eos_id is None:
            raise ValueError(f"tokenizer {path}: no end-of-sequence token (<|im_end|>, </s>, <|endoftext|>)")
        self.pad_id = self.eos_id if self.pad_id is None else self.pad_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)


def answer_first_tokens(tokenizer: TextTokenizer, answers: Sequence[str], caller: str) -> list[int]:
    """The first token id of each candidate answer, for scoring answers by their first-token
    probability; raises when an answer encodes to nothing or two answers share a first token
    (their probabilities would not tell them apart). `caller` names the function in the error."""
    first = []
    for a in answers:
        ids = tokenizer.encode(a)
        if not ids:
            raise ValueError(f"{caller}: answer {a!r} encodes to no token")
        first.append(ids[0])
    if len(set(first)) != len(first):
        raise ValueError(f"{caller}: answers {list(answers)} share a first token ({first}); "
                         "their first-token probabilities would not tell them apart")
    return first


def train_sentencepiece(sentences: Iterable[str], vocab_size: int) -> bytes:
    """A BPE model over `sentences`; single-threaded and unshuffled so it is reproducible."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        hard_vocab_limit=False,  # a small corpus may not support the full size
        user_defined_symbols=list(SPECIAL_PIECES), pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        character_coverage=1.0, num_threads=1, shuffle_input_sentence=False, minloglevel=2,
        add_dummy_prefix=False)  # templates are encoded piece by piece: no phantom leading spaces
    return model.getvalue()


SCENES_PER_LEVEL = 300  # ShapeComp scenes whose text trains the tokenizer (its vocabulary is small)


def _shapecomp_levels(config: Any) -> list[int]:
    return sorted({int(l) for ds in config.data.datasets.values() if ds.get("kind") == "shapecomp"
                   for l in ds.get("levels", (0,))})


def load_or_train_tokenizer(config: Any, workdir: str) -> TextTokenizer:
    tc = config.tokenizer
    if tc.kind == "hf":
        if not tc.path:
            raise ValueError("config.tokenizer.path is empty: point it at a tokenizer.json (kind='hf')")
        tok = HFTokenizer(tc.path)
    elif tc.kind == "sentencepiece":
        folder = os.path.join(workdir, "tokenizer")
        model_path, meta_path = os.path.join(folder, "spm.model"), os.path.join(folder, "meta.json")
        levels = _shapecomp_levels(config)
        if not levels and not os.path.exists(model_path):
            raise ValueError("config.tokenizer.kind='sentencepiece' trains on ShapeComp text, but config.data has "
                             "no shapecomp dataset; use kind='hf' with a tokenizer.json for other data")
        # The cached model is reused only if it was trained on the same corpus and size.
        corpus_spec = dict(levels=levels, scenes_per_level=SCENES_PER_LEVEL, vocab_size=tc.vocab_size) \
            if levels else None
        # QA records that ask the lookups (`qa_lookups`) add their wording.
        lookups = any(ds.get("qa_lookups", False) for ds in config.data.datasets.values()
                      if ds.get("kind") == "shapecomp")
        if corpus_spec is not None and lookups:
            corpus_spec["qa_lookups"] = True
        # Multimodal configs add the generation / editing wordings to the corpus.
        corpus_tasks = tuple(tc.get("corpus_tasks", ("caption", "qa", "edit")))
        if corpus_spec is not None and corpus_tasks != ("caption", "qa", "edit"):
            corpus_spec["tasks"] = list(corpus_tasks)
        meta = json.load(open(meta_path)) if os.path.exists(meta_path) else None
        if os.path.exists(model_path) and (corpus_spec is None or meta == corpus_spec):
            with open(model_path, "rb") as f:
                tok = SentencePieceTokenizer(f.read())
        else:
            from illume_jax.data.shapecomp import text_corpus
            proto = train_sentencepiece(text_corpus(levels, "train", SCENES_PER_LEVEL, corpus_tasks, lookups),
                                        tc.vocab_size)
            os.makedirs(folder, exist_ok=True)
            tmp = model_path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(proto)
            os.replace(tmp, model_path)  # atomic: a killed run never leaves half a model
            with open(meta_path, "w") as f:
                json.dump(corpus_spec, f)
            tok = SentencePieceTokenizer(proto)
    else:
        raise ValueError(f"config.tokenizer.kind={tc.kind!r}: expected 'sentencepiece' or 'hf'")
    if tok.vocab_size > config.model.text_vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but config.model.text_vocab_size is "
                         f"{config.model.text_vocab_size}; raise text_vocab_size (and vocab_size)")
    return tok

