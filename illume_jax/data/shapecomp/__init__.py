"""ShapeComp: procedural scenes of coloured shapes with exact scene graphs — the offline
stand-in for GenEval, POPE and editing benchmarks (shared/reference/shapecomp.md).
Every sample is a pure function of (level, split, index)."""
from illume_jax.data.shapecomp.edit import OPS, EditPair, edit_pair
from illume_jax.data.shapecomp.qa import (EXISTENCE_KINDS, POPE_SPLITS, QA_NEGATIVES, attribute_questions,
                                          existence_kind, existence_questions, questions)
from illume_jax.data.shapecomp.records import TASKS, WORDS, check_qa_turns, conversation_records, text_corpus
from illume_jax.data.shapecomp.render import cell_labels, cell_owners, object_cells, object_mask, png_bytes, render
from illume_jax.data.shapecomp.scene import (Obj, Scene, make_scene, object_relations, relations_between, scaled,
                                             shape_twin, shape_twins)
from illume_jax.data.shapecomp.text import available_tags, dense_caption, prompt_for, short_caption
from illume_jax.data.shapecomp.world import LEVELS, SPLITS, get_level

__all__ = [
    "OPS", "EditPair", "edit_pair", "EXISTENCE_KINDS", "existence_kind", "POPE_SPLITS", "QA_NEGATIVES",
    "attribute_questions", "existence_questions", "questions",
    "TASKS", "WORDS", "check_qa_turns", "conversation_records", "text_corpus",
    "cell_labels", "cell_owners", "object_cells", "object_mask", "png_bytes", "render", "Obj", "Scene",
    "make_scene", "scaled", "shape_twin", "shape_twins", "object_relations", "relations_between", "available_tags",
    "dense_caption", "prompt_for", "short_caption", "LEVELS", "SPLITS", "get_level",
]
