"""The shapes dataset (SHAPES.md) and its analyzer: geometry, captions, held-out rule, dataset, read-back, scoring."""
import itertools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from latentdiff.data import (ATTRIBUTES, BACKGROUNDS, COLOURS, HELD_OUT_TRIPLES, MAX_JITTER, POSITIONS, SHAPES, SIZES,
                             ShapesDataset, ShapeSpec, analyze, caption, evaluate, format_table, generate_and_analyze,
                             heldout_prompts, is_held_out, measure, parse_caption, render, score, trained_prompts,
                             write_image_folder)
from latentdiff.data.analyze import components
from latentdiff.data.shapes import coverage

GRID = list(itertools.product(COLOURS, SHAPES, SIZES, POSITIONS, BACKGROUNDS))  # 8 x 5 x 2 x 5 x 3 = 1200
SIGNS = ((1, 1), (1, -1), (-1, 1), (-1, -1))


def grid_specs(size=128, jitter=0.0, stride=1):
    """Every combination (or every stride-th), jittered by `jitter` * S with the four sign pairs in turn."""
    j = jitter * size
    return [ShapeSpec(*attrs, dx=SIGNS[k % 4][0] * j, dy=SIGNS[k % 4][1] * j)
            for k, attrs in enumerate(GRID) if k % stride == 0]


def degrade(image, rng):
    """What a generated image looks like at best: slightly blurred and noisy."""
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(radius=1)), dtype=np.float32)
    noisy = blurred + rng.normal(0.0, 8.0, blurred.shape)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


def truth(spec):
    return {a: getattr(spec, a) for a in ATTRIBUTES}


def misread(specs, size, rng=None):
    wrong = []
    for spec in specs:
        image = render(spec, size)
        got = analyze(degrade(image, rng) if rng is not None else image)
        if got != truth(spec):
            wrong.append((spec, got))
    return wrong


# --- the specification ---------------------------------------------------------------------------------------------
def test_constants_follow_the_specification_order():
    assert list(COLOURS) == ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"]
    assert COLOURS["purple"] == (140, 40, 200) and COLOURS["cyan"] == (20, 200, 220)
    assert BACKGROUNDS == {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
    assert SHAPES == ("circle", "square", "triangle", "diamond", "star")
    assert list(POSITIONS) == ["center", "top left", "top right", "bottom left", "bottom right"]
    assert POSITIONS["bottom left"] == (0.27, 0.73) and SIZES == {"large": 0.5, "small": 0.25}


@pytest.mark.parametrize("shape, area", [
    ("circle", math.pi * 32 ** 2), ("square", 64 ** 2), ("triangle", 64 ** 2 / 2), ("diamond", 64 ** 2 / 2),
    ("star", 5 * 32 * (0.45 * 32) * math.sin(math.radians(36))),  # ten triangles of sides R, r around 36 degrees
])
def test_rendered_area_matches_the_geometry(shape, area):
    alpha = coverage(shape, (64.0, 64.0, 32.0, 32.0), 128)
    assert abs(alpha.sum() - area) / area < 0.003


def test_render_places_the_box_exactly():
    image = np.asarray(render(ShapeSpec("blue", "square", "large", "center", "white")))
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8
    assert (image[32:96, 32:96] == COLOURS["blue"]).all()
    outside = np.ones((128, 128), bool)
    outside[32:96, 32:96] = False
    assert (image[outside] == 255).all()
    star = coverage("star", (64.0, 64.0, 32.0, 32.0), 128)
    ys, xs = np.nonzero(star > 0)
    assert np.allclose(star, star[:, ::-1], atol=0.07)  # the first point straight up: mirror-symmetric
    assert abs(ys.min() - 32) <= 1 and abs(ys.max() + 1 - (64 + 32 * math.sin(math.radians(54)))) <= 1
    assert abs(xs.max() + 1 - (64 + 32 * math.cos(math.radians(18)))) <= 1  # side points at +-18 degrees
    moved = np.nonzero(coverage("star", (61.0, 66.0, 32.0, 32.0), 128) > 0)
    assert abs(moved[0].min() - ys.min() - 2) <= 1 and abs(moved[1].min() - xs.min() + 3) <= 1
    star = np.asarray(render(ShapeSpec("red", "star", "small", "top right", "black", dx=-1.5, dy=1.0), 64))
    assert len(np.unique(star.reshape(-1, 3), axis=0)) > 2  # anti-aliased edges


def test_render_any_multiple_of_8_and_clear_errors():
    spec = ShapeSpec("green", "triangle", "small", "bottom left", "gray")
    assert render(spec, 8).size == (8, 8) and render(spec, 200).size == (200, 200)
    with pytest.raises(ValueError, match="multiple of 8"):
        render(spec, 100)
    with pytest.raises(ValueError, match="jitter"):
        render(ShapeSpec("green", "triangle", "small", "bottom left", "gray", dx=4.0), 128)
    with pytest.raises(ValueError, match="unknown colour 'grey'"):
        ShapeSpec("grey", "circle", "small", "center", "white")


# --- captions --------------------------------------------------------------------------------------------------------
def test_full_captions_parse_back_to_the_spec():
    assert caption(ShapeSpec("purple", "star", "small", "top left", "gray")) == \
        "a small purple star in the top left corner on a gray background"
    for spec in grid_specs():
        assert parse_caption(caption(spec)) == truth(spec)


def test_partial_captions_always_name_colour_and_shape_and_stay_natural():
    rng = np.random.default_rng(0)
    spec = ShapeSpec("orange", "circle", "small", "center", "black")
    texts = [caption(spec, rng, p_drop=0.5) for _ in range(400)]
    assert set(texts) == {  # all 2^3 subsets appear, each grammatical ("an orange", never "a orange")
        "a small orange circle in the center on a black background", "a small orange circle in the center",
        "a small orange circle on a black background", "a small orange circle", "an orange circle",
        "an orange circle in the center", "an orange circle on a black background",
        "an orange circle in the center on a black background"}
    for text in texts:
        named = parse_caption(text)
        assert named["colour"] == "orange" and named["shape"] == "circle"
        assert all(truth(spec)[k] == v for k, v in named.items())
    shares = [np.mean([k in parse_caption(t) for t in texts]) for k in ("size", "position", "background")]
    assert all(0.4 < s < 0.6 for s in shares)
    assert caption(spec, np.random.default_rng(0), p_drop=1.0) == "an orange circle"
    with pytest.raises(ValueError, match="does not follow"):
        parse_caption("a circle that is red")


# --- held-out rule, prompts, dataset ------------------------------------------------------------------------------
def test_held_out_rule_has_25_triples():
    triples = [(c, s, p) for c in range(8) for s in range(5) for p in range(5) if is_held_out(c, s, p)]
    assert len(triples) == 25 and tuple(triples) == HELD_OUT_TRIPLES
    assert is_held_out(0, 0, 0) and is_held_out(1, 2, 1) and not is_held_out(1, 0, 0)


def test_dataset_never_yields_a_held_out_triple_and_covers_the_rest():
    dataset = ShapesDataset(3000, seed=3)
    triples = [dataset.spec(i).triple for i in range(len(dataset))]
    assert not any(is_held_out(*t) for t in triples)
    assert len(set(triples)) == 200 - 25
    specs = [dataset.spec(i) for i in range(len(dataset))]
    assert max(max(abs(s.dx), abs(s.dy)) for s in specs) <= MAX_JITTER * 128
    assert {s.background for s in specs} == set(BACKGROUNDS) and {s.size for s in specs} == set(SIZES)


def test_dataset_items_are_deterministic_per_index():
    a, b = ShapesDataset(50, size=64, seed=7), ShapesDataset(50, size=64, seed=7)
    for i in (0, 13, 49):
        x, y = a[i], b[i]
        assert x["text"] == y["text"] and torch.equal(x["pixel_values"], y["pixel_values"])
        assert x["pixel_values"].shape == (3, 64, 64) and x["pixel_values"].dtype == torch.float32
        assert x["pixel_values"].min() >= -1 and x["pixel_values"].max() <= 1
        named = parse_caption(x["text"])
        assert all(getattr(a.spec(i), k) == v for k, v in named.items())
    assert a[5]["text"] == a[5]["text"] and torch.equal(a[5]["pixel_values"], a[5]["pixel_values"])
    other = ShapesDataset(50, size=64, seed=8)
    assert [other.spec(i) for i in range(10)] != [a.spec(i) for i in range(10)]
    with pytest.raises(IndexError):
        a[50]
    with pytest.raises(ValueError, match="jitter"):
        ShapesDataset(10, jitter=0.1)
    with pytest.raises(ValueError, match="multiple of 8"):
        ShapesDataset(10, size=30)


def test_write_image_folder(tmp_path):
    folder = write_image_folder(tmp_path / "shapes", 6, size=32, seed=1)
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    dataset = ShapesDataset(6, size=32, seed=1)
    assert [line["text"] for line in lines] == [dataset[i]["text"] for i in range(6)]
    for i, line in enumerate(lines):
        image = Image.open(folder / line["file_name"])
        assert image.size == (32, 32) and image.mode == "RGB"
        expected = ((dataset[i]["pixel_values"] + 1) * 127.5).round().permute(1, 2, 0).numpy()
        assert np.array_equal(np.asarray(image), expected.astype(np.uint8))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_image_folder(folder, 2)


def test_evaluation_prompts():
    held = heldout_prompts()
    assert len(held) == 150 and len({text for text, _ in held}) == 150
    assert all(spec.held_out and parse_caption(text) == truth(spec) for text, spec in held)
    trained = trained_prompts(150, seed=0)
    assert len({text for text, _ in trained}) == 150 and not any(spec.held_out for _, spec in trained)
    assert trained == trained_prompts(150, seed=0) and trained != trained_prompts(150, seed=1)


# --- the analyzer ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("jitter", [0.0, MAX_JITTER])
def test_analyzer_reads_every_ground_truth_image(jitter):
    assert misread(grid_specs(128, jitter), 128) == []


def test_analyzer_survives_blur_and_noise():
    rng = np.random.default_rng(0)
    assert misread(grid_specs(128, MAX_JITTER, stride=3), 128, rng) == []


@pytest.mark.parametrize("size", [64, 96])
def test_analyzer_at_other_sizes(size):
    rng = np.random.default_rng(size)
    assert misread(grid_specs(size, MAX_JITTER, stride=7), size) == []
    assert misread(grid_specs(size, 0.0, stride=11), size, rng) == []


def test_analyzer_ignores_specks_and_answers_for_bad_images():
    pixels = np.asarray(render(ShapeSpec("blue", "star", "small", "center", "white"))).copy()
    pixels[5:8, 100:103] = 0  # a 3x3 speck far from the shape, and a single odd pixel
    pixels[110, 20] = (255, 0, 0)
    assert analyze(pixels) == {"background": "white", "colour": "blue", "shape": "star", "size": "small",
                               "position": "center"}
    nothing = {"colour": "none", "shape": "none", "size": "none", "position": "none"}
    assert analyze(Image.new("RGB", (128, 128), (0, 0, 0))) == {"background": "black", **nothing}
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert set(analyze(noise)) == set(ATTRIBUTES) and analyze(noise)["shape"] == "none"
    assert set(analyze(render(ShapeSpec("red", "circle", "small", "center", "gray"), 8))) == set(ATTRIBUTES)
    reading = measure(render(ShapeSpec("pink", "diamond", "large", "top right", "gray")))
    assert max(reading.ious, key=reading.ious.get) == "diamond" and reading.ious["diamond"] > 0.95
    with pytest.raises(ValueError, match="square"):
        analyze(Image.new("RGB", (128, 64)))
    with pytest.raises(ValueError, match="multiple of 8"):
        analyze(Image.new("RGB", (100, 100)))


def test_connected_components_match_a_flood_fill():
    mask = np.random.default_rng(1).random((24, 31)) < 0.45
    labels = components(mask)
    assert ((labels >= 0) == mask).all()
    seen = np.zeros_like(mask)
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, region = [start], set()
        while stack:  # an independent 8-connected flood fill
            y, x = stack.pop()
            if (y, x) in region or not (0 <= y < 24 and 0 <= x < 31) or not mask[y, x]:
                continue
            region.add((y, x))
            stack += [(y + a, x + b) for a in (-1, 0, 1) for b in (-1, 0, 1)]
        ys, xs = zip(*region)
        seen[ys, xs] = True
        assert len(set(labels[ys, xs])) == 1 and (labels == labels[start]).sum() == len(region)


# --- scoring ---------------------------------------------------------------------------------------------------------
def test_score_and_table():
    spec = ShapeSpec("red", "circle", "small", "center", "white")
    right = truth(spec)
    results = [(spec, right), (spec, {**right, "shape": "square"}), (spec, {**right, "shape": "none", "size": "none"}),
               (spec, right)]
    scores = score(results)
    assert scores == {"background": 1.0, "colour": 1.0, "shape": 0.5, "size": 0.75, "position": 1.0, "all": 0.5}
    table = format_table({1.0: scores, 7.5: {**scores, "all": 0.125}}).splitlines()
    assert table[0] == "| guidance | background | colour | shape | size | position | all |"
    assert table[2] == "| 1 | 100.0% | 100.0% | 50.0% | 75.0% | 100.0% | 50.0% |"
    assert table[3].startswith("| 7.5 |") and table[3].endswith("| 12.5% |")
    with pytest.raises(ValueError, match="at least one"):
        score([])


def test_evaluate_calls_generate_in_batches_with_fixed_seeds():
    prompts = heldout_prompts()[:12]
    calls = []

    def generate(texts, seeds):  # a perfect "model": draws what the prompt says
        calls.append(list(seeds))
        return [render(ShapeSpec(**parse_caption(t)), 64) for t in texts]

    assert evaluate(generate, prompts, seed=100, batch_size=5) == dict.fromkeys((*ATTRIBUTES, "all"), 1.0)
    assert calls == [list(range(100, 105)), list(range(105, 110)), [110, 111]]
    results = generate_and_analyze(lambda texts, seeds: [Image.new("RGB", (64, 64))] * len(texts), prompts[:3])
    assert [got["shape"] for _, got in results] == ["none"] * 3
    with pytest.raises(ValueError, match="one image per prompt"):
        evaluate(lambda texts, seeds: [], prompts)
