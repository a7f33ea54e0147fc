"""The synthetic scene world: determinism, truth of answers, seed ranges."""

import random
import re

import numpy as np

from vision import scenes
from vision.scenes import (
    COLORS, COUNT_WORDS, HELDOUT_SEEDS, KINDS, POSITIONS, SHAPES, SIZES, TRAIN_SEED_START,
    Example, bundled_paths, examples_for_scene, is_correct, make_examples, render, sample_scene,
    scene_for_seed,
)


def test_world_size():
    assert len(SHAPES) >= 5 and len(COLORS) == 8 and 2 <= len(SIZES) <= 3 and len(POSITIONS) == 9
    assert set(KINDS) == {"caption", "color", "count", "position", "yesno"}


def test_deterministic_for_a_seed():
    a = make_examples(3, 10, size=48)
    b = make_examples(3, 10, size=48)
    assert [(e.prompt, e.answer, e.kind) for e in a] == [(e.prompt, e.answer, e.kind) for e in b]
    for x, y in zip(a, b):
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
    assert sample_scene(random.Random(5)) == sample_scene(random.Random(5))
    c = make_examples(4, 10, size=48)
    assert [e.answer for e in a] != [e.answer for e in c]


def test_heldout_and_training_seeds_disjoint():
    assert min(HELDOUT_SEEDS) == 0 and max(HELDOUT_SEEDS) < TRAIN_SEED_START
    # the training script only draws scenes from seeds >= TRAIN_SEED_START
    from demos import build_default_models as b

    assert not set(range(b.TRAIN_SEED_START, b.TRAIN_SEED_START + 10)) & set(HELDOUT_SEEDS)


def test_every_prompt_type_present():
    exs = make_examples(0, 50, size=32)
    assert {e.kind for e in exs} == set(KINDS)
    assert all(isinstance(e, Example) for e in exs)


def test_scene_constraints():
    for s in range(300):
        sc = scene_for_seed(s)
        assert 1 <= len(sc.objects) <= 4
        cells = [o.cell for o in sc.objects]
        assert len(set(cells)) == len(cells)
        for o in sc.objects:
            assert o.shape in SHAPES and o.color in COLORS and o.size in SIZES


def test_answers_consistent_with_scene():
    for s in range(200):
        for e in examples_for_scene(s, size=32):
            sc = e.scene
            objs = sc.objects
            if e.kind == "caption":
                assert e.prompt == "Describe the image."
                assert e.answer == sc.caption()
                for o in objs:
                    assert f"a {o.size} {o.color} {o.shape} at {o.position}" in e.answer
            elif e.prompt == "How many objects are there?":
                assert e.answer == COUNT_WORDS[len(objs)]
            elif e.kind == "color":
                shape = re.match(r"What color is the (\w+)\?", e.prompt).group(1)
                hits = [o for o in objs if o.shape == shape]
                assert len(hits) == 1 and e.answer == hits[0].color
            elif e.kind == "position":
                color, shape = re.match(r"Where is the (\w+) (\w+)\?", e.prompt).groups()
                hits = [o for o in objs if (o.color, o.shape) == (color, shape)]
                assert len(hits) == 1 and e.answer == hits[0].position
            elif e.kind == "yesno":
                color, shape = re.match(r"Is there a (\w+) (\w+)\?", e.prompt).groups()
                present = any((o.color, o.shape) == (color, shape) for o in objs)
                assert e.answer == ("yes" if present else "no")


def test_yes_and_no_both_occur():
    answers = [examples_for_scene(s, kinds=("yesno",), size=16)[0].answer for s in range(100)]
    assert 30 < answers.count("yes") < 70


def test_answers_depend_on_image():
    caps = {examples_for_scene(s, kinds=("caption",), size=16)[0].answer for s in range(100)}
    assert len(caps) > 95


def test_render():
    sc = scene_for_seed(7)
    img = render(sc, size=96)
    assert img.mode == "RGB" and img.size == (96, 96)
    arr = np.asarray(img).astype(int)
    # some pixel of every object's colour is present (the cell centre)
    for o in sc.objects:
        r, c = divmod(o.cell, 3)
        y, x = int((r + 0.5 + o.dy) * 32), int((c + 0.5 + o.dx) * 32)
        assert np.abs(arr[y, x] - np.array(COLORS[o.color])).sum() < 60


def test_is_correct_normalises_whitespace():
    e = examples_for_scene(1, kinds=("caption",), size=16)[0]
    assert is_correct(e.answer, e)
    assert is_correct("  " + e.answer.replace(",", " ,").replace(".", " .") + "\n", e)
    assert not is_correct(e.answer[:-1] + " and", e)


def test_vocabulary_covers_all_text():
    vocab = set(scenes.vocabulary())
    for s in range(300):
        for e in examples_for_scene(s, size=8):
            for t in re.findall(r"\w+|[^\w\s]", e.prompt + " " + e.answer):
                assert t in vocab, t


def test_bundled_paths():
    t, d = bundled_paths()
    assert t.name == "target" and d.name == "text-drafter" and t.parent == d.parent
