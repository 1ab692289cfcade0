"""Datasets: the synthetic shapes dataset (specification: SHAPES.md) and its deterministic analyzer."""
from .analyze import Reading, analyze, evaluate, format_table, generate_and_analyze, measure, score
from .shapes import (ATTRIBUTES, BACKGROUNDS, COLOURS, HELD_OUT_TRIPLES, MAX_JITTER, POSITIONS, SHAPES, SIZES,
                     ShapesDataset, ShapeSpec, caption, heldout_prompts, is_held_out, parse_caption, render,
                     trained_prompts, write_image_folder)

__all__ = [
    "ATTRIBUTES", "BACKGROUNDS", "COLOURS", "HELD_OUT_TRIPLES", "MAX_JITTER", "POSITIONS", "SHAPES", "SIZES",
    "Reading", "ShapeSpec", "ShapesDataset", "analyze", "caption", "evaluate", "format_table", "generate_and_analyze",
    "heldout_prompts", "is_held_out", "measure", "parse_caption", "render", "score", "trained_prompts",
    "write_image_folder",
]
