"""The synthetic benchmark: determinism, disjoint splits, exact groundings and a faithful target."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest

from cag.data.sample import validate_grounding
from cag.data.synthetic import SyntheticConfig, characters, generate_sample, generate_split

CFG = SyntheticConfig(image_size=96, num_characters=[1, 3], seed=3)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def samples():
    return list(generate_split("train", 60, CFG)) + list(generate_split("test", 60, CFG))


def _px_box(box, size):
    x1, y1, x2, y2 = (int(round(v / 1000 * size)) for v in box)
    return x1, y1, x2, y2


def _crop(img, box):
    arr = np.asarray(img)
    x1, y1, x2, y2 = _px_box(box, arr.shape[1])
    return arr[y1:y2, x1:x2]


def _exact(arr, rgb):
    return np.all(arr == np.asarray(rgb, dtype=arr.dtype), axis=-1)


def _cast(split):
    return {c.name: c for c in characters(split)}


def test_same_seed_gives_byte_identical_samples_and_another_seed_differs():
    a = generate_sample("train", 7, CFG)
    b = generate_sample("train", 7, CFG)
    assert a.instruction == b.instruction
    assert a.groundings == b.groundings
    assert a.truth == b.truth
    assert [r.tobytes() for r in a.references] == [r.tobytes() for r in b.references]
    assert a.target.tobytes() == b.target.tobytes()
    other = generate_sample("train", 7, SyntheticConfig(image_size=96, num_characters=[1, 3], seed=4))
    assert other.instruction != a.instruction or other.target.tobytes() != a.target.tobytes()


def test_train_val_and_test_casts_share_no_name_and_no_attribute_combination():
    splits = {s: characters(s) for s in ("train", "val", "test")}
    for s1 in splits:
        for s2 in splits:
            if s1 < s2:
                assert not {c.name for c in splits[s1]} & {c.name for c in splits[s2]}
                assert not {c.combination for c in splits[s1]} & {c.combination for c in splits[s2]}


def test_generated_test_samples_only_use_test_characters(samples):
    train_names, test_names = set(_cast("train")), set(_cast("test"))
    for s in samples:
        names = {subj.name for subj in s.truth.subjects}
        assert names <= (train_names if s.key.startswith("train") else test_names), s.key


def test_every_grounding_validates_and_every_figure_mention_is_grounded(samples):
    for s in samples:
        assert s.groundings, s.key
        for g in s.groundings:
            validate_grounding(g, len(s.references), s.instruction)
        # Each "(Fig.k)" in the text must sit inside an occurrence of a grounded phrase of reference k.
        covered = set()
        for g in s.groundings:
            for m in re.finditer(re.escape(g.phrase), s.instruction):
                if g.phrase.endswith(f"(Fig.{g.image_id})"):
                    covered.add(m.end() - 1)
        for m in re.finditer(r"\(Fig\.(\d+)\)", s.instruction):
            assert m.end() - 1 in covered, (s.key, m.group(0), s.instruction)


def test_every_attribute_of_every_character_is_grounded_in_its_own_reference(samples):
    for s in samples:
        cast = _cast(s.key.split("-")[0])
        by_phrase = {g.phrase: g.image_id for g in s.groundings}
        for subj in s.truth.subjects:
            ch = cast[subj.name]
            wanted = [subj.phrase, ch.hair_phrase, ch.top_phrase, ch.bottom_phrase]
            if ch.accessory_phrase:
                wanted.append(ch.accessory_phrase)
            for phrase in wanted:
                assert by_phrase.get(phrase) == subj.image_id, (s.key, phrase)
                assert phrase in s.instruction


def test_part_boxes_are_tight_around_the_drawn_hair_shirt_and_pants(samples):
    for s in samples:
        cast = _cast(s.key.split("-")[0])
        boxes = {(g.phrase, g.image_id): g.bbox_2d for g in s.groundings}
        for subj in s.truth.subjects:
            ch = cast[subj.name]
            ref = np.asarray(s.references[subj.image_id - 1])
            for part, phrase, majority in (
                ("hair", ch.hair_phrase, 0.3),
                ("top", ch.top_phrase, 0.35),  # stripes take up to a third
                ("bottom", ch.bottom_phrase, 0.6),
            ):
                colour = subj.colors[part]
                box = boxes[(phrase, subj.image_id)]
                inside = _crop(ref, box)
                share = _exact(inside, colour).mean()
                assert share >= majority, (s.key, phrase, share)
                # nothing of that colour lies outside the box
                assert _exact(inside, colour).sum() == _exact(ref, colour).sum(), (s.key, phrase)


def test_character_box_is_exactly_the_non_background_region_of_its_reference(samples):
    for s in samples:
        for subj in s.truth.subjects:
            ref = np.asarray(s.references[subj.image_id - 1])
            fg = np.any(ref != ref[0, 0], axis=-1)
            ys, xs = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
            size = ref.shape[0]
            expected = [xs[0] / size * 1000, ys[0] / size * 1000, (xs[-1] + 1) / size * 1000,
                        (ys[-1] + 1) / size * 1000]
            assert list(subj.reference_bbox_2d) == pytest.approx(expected, abs=0.01), s.key
            grounded = next(g for g in s.groundings if g.phrase == subj.phrase)
            assert grounded.bbox_2d == subj.reference_bbox_2d


def test_prop_boxes_hold_the_prop_in_the_scene_reference_and_the_target(samples):
    for s in samples:
        scene = s.truth.scene
        ref = np.asarray(s.references[scene.image_id - 1])
        target = np.asarray(s.target)
        assert scene.image_id == len(s.references)
        for prop in scene.props:
            inside = _crop(ref, prop.reference_bbox_2d)
            assert _exact(inside, prop.color).mean() >= 0.25, (s.key, prop.name)
            assert _exact(inside, prop.color).sum() == _exact(ref, prop.color).sum(), (s.key, prop.name)
            assert prop.target_bbox_2d == prop.reference_bbox_2d
            assert prop.phrase in s.instruction
            # named in the instruction, so it must stay visible in the target: few prop pixels repainted
            sky, ground = scene.colors["sky"], scene.colors["ground"]
            t_inside = _crop(target, prop.target_bbox_2d)
            prop_px = ~_exact(inside, sky) & ~_exact(inside, ground)
            kept = (prop_px & np.all(t_inside == inside, axis=-1)).sum() / prop_px.sum()
            assert kept >= 0.8, (s.key, prop.name, kept)
        # The target's background is the scene reference wherever no character stands.
        free = np.ones(target.shape[:2], dtype=bool)
        for subj in s.truth.subjects:
            x1, y1, x2, y2 = _px_box(subj.target_bbox_2d, target.shape[1])
            free[y1:y2, x1:x2] = False
        assert np.array_equal(target[free], ref[free]), s.key
        assert tuple(ref[0, 0]) == tuple(scene.colors["sky"])
        assert tuple(ref[-1, 0]) == tuple(scene.colors["ground"])


_POSITION_WORDS = {"left": ("left",), "centre": ("centre", "middle"), "right": ("right",)}


def test_target_draws_each_character_on_its_instructed_side_in_its_colours(samples):
    for s in samples:
        target = np.asarray(s.target)
        for subj in s.truth.subjects:
            x1, _, x2, _ = subj.target_bbox_2d
            cx = (x1 + x2) / 2
            expected = {"left": cx < 1000 / 3, "centre": 1000 / 3 <= cx <= 2000 / 3, "right": cx > 2000 / 3}
            assert expected[subj.position], (s.key, subj.name, subj.position, cx)
            # the sentence that introduces the character says the same side
            intro = next(sent for sent in re.split(r"(?<=\.) ", s.instruction) if subj.phrase in sent)
            assert any(w in intro for w in _POSITION_WORDS[subj.position]), (s.key, intro)
            inside = _crop(target, subj.target_bbox_2d)
            for part, share in (("hair", 0.03), ("top", 0.1), ("bottom", 0.1)):
                assert _exact(inside, subj.colors[part]).mean() >= share, (s.key, subj.name, part)


def test_close_up_characters_are_taller_than_medium_and_long_shot_ones(samples):
    heights: dict[str, list[float]] = {"close-up": [], "medium": [], "long": []}
    for s in samples:
        first = s.instruction.split(".")[0].lower()
        shot = next(k for k in heights if k in first)
        heights[shot] += [b.target_bbox_2d[3] - b.target_bbox_2d[1] for b in s.truth.subjects]
    assert all(heights.values()), {k: len(v) for k, v in heights.items()}
    assert min(heights["close-up"]) > max(heights["medium"]) > 0
    assert min(heights["medium"]) > max(heights["long"])


def test_truth_has_the_documented_shape(samples):
    s = samples[0]
    shape = s.truth.to_dict()
    assert set(shape) == {"image_size", "subjects", "scene"}
    assert shape["image_size"] == [CFG.image_size, CFG.image_size]
    for subj in shape["subjects"]:
        assert set(subj) == {"name", "image_id", "phrase", "position", "target_bbox_2d", "reference_bbox_2d", "colors"}
        assert set(subj["colors"]) == {"hair", "top", "bottom"}
        assert all(isinstance(v, int) for rgb in subj["colors"].values() for v in rgb)
    assert set(shape["scene"]) == {"image_id", "colors", "props"}
    assert set(shape["scene"]["colors"]) == {"sky", "ground"}
    for prop in shape["scene"]["props"]:
        assert set(prop) == {"name", "phrase", "color", "target_bbox_2d", "reference_bbox_2d"}


def test_character_count_sets_references_and_task_type(samples):
    counts = set()
    for s in samples:
        n = len(s.truth.subjects)
        counts.add(n)
        assert len(s.references) == n + 1
        assert s.task_type == ("scene_single_character" if n == 1 else "scene_multi_character")
        assert all(r.size == (CFG.image_size, CFG.image_size) and r.mode == "RGB" for r in s.references)
        assert s.target.size == (CFG.image_size, CFG.image_size)
    assert counts == {1, 2, 3}


def test_300_sample_test_split_at_128px_is_quick_with_unique_dotless_keys():
    start = time.perf_counter()
    split = list(generate_split("test", 300, SyntheticConfig()))
    elapsed = time.perf_counter() - start
    keys = [s.key for s in split]
    assert keys[0] == "test-000000" and keys[-1] == "test-000299"
    assert len(set(keys)) == 300 and not any("." in k for k in keys)
    assert all(len(s.references) == 3 for s in split)
    assert elapsed < 15, f"300 samples took {elapsed:.1f} s"


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"image_size": 32}, "image_size"),
        ({"num_characters": 4}, "num_characters"),
        ({"num_characters": [2, 1]}, "num_characters"),
        ({"num_characters": [0, 2]}, "num_characters"),
        ({"num_characters": 1, "place": "side"}, "place"),
        ({"num_characters": 2, "place": "centre"}, "place"),
        ({"shot": "wide"}, "shot"),
        ({"num_characters": 3, "shot": "close-up"}, "shot"),
        ({"describe_colours": "no"}, "describe_colours"),
        ({"train_roster": "random"}, "train_roster"),
    ],
)
def test_bad_config_is_refused_naming_the_field(kwargs, culprit):
    with pytest.raises(ValueError, match=culprit):
        generate_sample("train", 0, SyntheticConfig(**kwargs))


def test_unknown_split_is_refused_naming_it():
    with pytest.raises(ValueError, match="'dev'"):
        generate_sample("dev", 0, CFG)


def _level(k: int, **changes) -> SyntheticConfig:
    from omegaconf import OmegaConf

    from cag.data.sources import synthetic_config

    return synthetic_config({**OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "synthetic" / f"level{k}.yaml")),
                             **changes})


def _shot(sample) -> str:
    first = sample.instruction.split(".")[0].lower()
    return next(k for k in ("close-up", "medium", "long") if k in first)


def test_ladder_levels_fix_or_free_exactly_what_their_table_says():
    """Level 0: one subject, centre, medium; 1: the place varies; 2: the shot too; 3: two subjects; 4: three."""
    seen = {}
    for k in range(5):
        samples = [generate_sample(split, i, _level(k)) for split in ("train", "test") for i in range(40)]
        seen[k] = ({len(s.truth.subjects) for s in samples}, {p.position for s in samples for p in s.truth.subjects},
                   {_shot(s) for s in samples})
        test_names = {c.name for c in characters("test")}
        assert all(p.name in test_names for s in samples[40:] for p in s.truth.subjects)  # the roster split holds
    assert seen[0] == ({1}, {"centre"}, {"medium"})
    assert seen[1] == ({1}, {"left", "centre", "right"}, {"medium"})
    assert seen[2] == ({1}, {"left", "centre", "right"}, {"close-up", "medium", "long"})
    assert seen[3][0] == {2} and len(seen[3][2]) >= 2
    assert seen[4][0] == {3} and seen[4][2] == {"medium", "long"}  # a close-up leaves no room for three


def test_level_3_is_todays_benchmark_byte_for_byte():
    for i in range(6):
        a, b = generate_sample("test", i, SyntheticConfig()), generate_sample("test", i, _level(3))
        assert a.instruction == b.instruction and a.groundings == b.groundings
        assert all(x.tobytes() == y.tobytes() for x, y in zip([*a.references, a.target], [*b.references, b.target],
                                                               strict=True))


@pytest.mark.parametrize("level", [3, 4])
def test_ordered_places_put_the_references_left_to_right_and_change_nothing_else(level):
    """place=ordered: a subject's reference slot alone says where it stands (binding without reading the text);
    the cast, the set of places, the shot, the scene and its props are the sample drawn under place=text."""
    xs = {"left": 0, "centre": 1, "right": 2}
    unordered = 0
    for i in range(30):
        told = generate_sample("test", i, _level(level))
        s = generate_sample("test", i, _level(level, place="ordered"))
        positions = [p.position for p in s.truth.subjects]
        assert [xs[p] for p in positions] == sorted(xs[p] for p in positions), (i, positions)
        assert [p.name for p in s.truth.subjects] == [p.name for p in told.truth.subjects]
        assert sorted(positions) == sorted(p.position for p in told.truth.subjects)
        assert _shot(s) == _shot(told) and s.truth.scene == told.truth.scene
        assert all(a.tobytes() == b.tobytes() for a, b in zip(s.references, told.references, strict=True))
        unordered += positions != [p.position for p in told.truth.subjects]
    assert unordered >= 5, "under place=text the reference order and the left-to-right order are independent"
    with pytest.raises(ValueError, match="ordered"):
        _level(3, place="sorted").check()


@pytest.mark.parametrize("colours", [True, False])
def test_ground_places_adds_each_subjects_place_words_to_its_reference_and_changes_nothing_else(colours):
    """ground_places: the words that say where a subject stands point at its reference (eq. 9 then ties them to
    its appearance); the instruction, the images and the other groundings are those of ground_places=false."""
    words = {"left": ("on the left side", "on the left"), "centre": ("in the centre", "in the middle"),
             "right": ("on the right side", "on the right")}
    for i in range(30):
        told = generate_sample("test", i, _level(3, describe_colours=colours))
        s = generate_sample("test", i, _level(3, describe_colours=colours, ground_places=True))
        assert s.instruction == told.instruction and s.target.tobytes() == told.target.tobytes()
        assert all(a.tobytes() == b.tobytes() for a, b in zip(s.references, told.references, strict=True))
        assert s.groundings[: len(told.groundings)] == told.groundings
        added = s.groundings[len(told.groundings):]
        assert len(added) == len(s.truth.subjects) == 2
        for g, subj in zip(added, s.truth.subjects, strict=True):
            name = next(t for t in told.groundings if t.phrase == subj.phrase)
            assert (g.image_id, g.bbox_2d) == (subj.image_id, name.bbox_2d)  # the subject's whole figure
            said = [w for w in words[subj.position] if w.lower() in s.instruction.lower()]
            assert g.phrase in s.instruction and g.phrase.lower() == said[0], (i, g.phrase, said)


def test_ground_places_off_keeps_earlier_generated_image_folders():
    from evaluation.generation import _fingerprint_data

    syn = {"image_size": 128, "num_characters": 2, "seed": 0, "place": "text", "shot": "text",
           "describe_colours": True}
    before = {"source": "synthetic", "split": "test", "synthetic": syn}
    assert _fingerprint_data({**before, "synthetic": {**syn, "ground_places": False}}) == before
    assert _fingerprint_data({**before, "synthetic": {**syn, "ground_places": True}}) != before
    assert _fingerprint_data({**before, "synthetic": {**syn, "train_roster": "fixed"}}) == before
    assert _fingerprint_data({**before, "synthetic": {**syn, "train_roster": "per_sample"}}) != before


@pytest.mark.parametrize("level", [0, 3, 4])
def test_per_sample_roster_redraws_training_characters_and_leaves_val_and_test_alone(level):
    """train_roster=per_sample: a training name carries no fixed look (the same name wears many), and val/test
    samples are byte-identical to the fixed roster's, so every test split and its scores stay comparable."""
    fixed = {c.name: tuple(sorted(c.colours().items())) for c in characters("train")}
    looks: dict[str, set] = {}
    for i in range(120):
        s = generate_sample("train", i, _level(level, train_roster="per_sample"))
        for subj in s.truth.subjects:
            assert subj.name in fixed, (s.key, subj.name)
            looks.setdefault(subj.name, set()).add(tuple(sorted(subj.colors.items())))
    assert sum(len(v) for v in looks.values()) > 90  # drawn per sample, not 30 fixed looks
    assert max(len(v) for v in looks.values()) >= 3
    assert sum(look != {fixed[name]} for name, look in looks.items()) >= len(looks) - 1
    for split in ("val", "test"):
        for i in range(10):
            a = generate_sample(split, i, _level(level))
            b = generate_sample(split, i, _level(level, train_roster="per_sample"))
            assert a.instruction == b.instruction and a.groundings == b.groundings and a.truth == b.truth
            assert all(x.tobytes() == y.tobytes() for x, y in zip([*a.references, a.target],
                                                                   [*b.references, b.target], strict=True))


def test_per_sample_training_characters_never_look_like_a_val_or_test_character(monkeypatch):
    """Test characters stay unseen: a drawn look equal to a held-out one is redrawn. The draw is forced onto a
    test character's look first, so the check cannot pass by luck of the odds (about 1 in 10,000 a draw)."""
    import dataclasses
    import random

    from cag.data import synthetic as syn

    held = characters("test")[4]
    real = syn._draw_appearance
    calls = {"n": 0}

    def first_a_test_look(rng, name):
        calls["n"] += 1
        return dataclasses.replace(held, name=name) if calls["n"] == 1 else real(rng, name)

    monkeypatch.setattr(syn, "_draw_appearance", first_a_test_look)
    cast = syn._choose_cast(random.Random(0), "train", 1, "per_sample")
    assert calls["n"] >= 2 and cast[0].combination != held.combination
    held_out = {c.combination for split in ("val", "test") for c in characters(split)}
    monkeypatch.setattr(syn, "_draw_appearance", real)
    for seed in range(300):
        for ch in syn._choose_cast(random.Random(seed), "train", 2, "per_sample"):
            assert ch.combination not in held_out and ch.name in {c.name for c in characters("train")}


@pytest.mark.parametrize("level", [0, 3])
def test_without_colour_words_the_instruction_names_each_subject_and_its_place_only(level):
    for i in range(20):
        told = generate_sample("test", i, _level(level))
        s = generate_sample("test", i, _level(level, describe_colours=False))
        assert s.target.tobytes() == told.target.tobytes()  # the same picture is asked for
        for subj, ch in zip(s.truth.subjects, (_cast("test")[p.name] for p in s.truth.subjects), strict=True):
            for phrase in (ch.hair_phrase, ch.top_phrase, ch.bottom_phrase, ch.accessory_phrase):
                if phrase:
                    assert phrase not in s.instruction, (s.key, phrase)
            assert subj.phrase in s.instruction
        subject_ids = {p.image_id for p in s.truth.subjects}
        assert {g.phrase for g in s.groundings if g.image_id in subject_ids} == {p.phrase for p in s.truth.subjects}


def test_per_sample_characters_get_exact_groundings_and_are_drawn_in_their_colours():
    """A drawn look is grounded and painted as a roster character is: each part phrase's box in its reference holds
    that part's colour (and all of it), and the target draws the figure in those colours at its instructed side."""
    cfg = SyntheticConfig(image_size=96, num_characters=[1, 3], seed=5, train_roster="per_sample")
    part_of = (("pants", "bottom", 0.6), ("shirt", "top", 0.35), ("hair", "hair", 0.3), ("twin-tails", "hair", 0.3))
    for s in generate_split("train", 40, cfg):
        for g in s.groundings:
            validate_grounding(g, len(s.references), s.instruction)
        for subj in s.truth.subjects:
            ref = np.asarray(s.references[subj.image_id - 1])
            checked = set()
            for g in s.groundings:
                if g.image_id != subj.image_id:
                    continue
                part = next(((p, m) for word, p, m in part_of if g.phrase.endswith(word)), None)
                if part is None:
                    continue
                colour = subj.colors[part[0]]
                inside = _crop(ref, g.bbox_2d)
                assert _exact(inside, colour).mean() >= part[1], (s.key, g.phrase)
                assert _exact(inside, colour).sum() == _exact(ref, colour).sum(), (s.key, g.phrase)
                checked.add(part[0])
            assert checked == {"hair", "top", "bottom"}, (s.key, subj.name, checked)
            figure = _crop(s.target, subj.target_bbox_2d)
            for part in ("hair", "top", "bottom"):
                assert _exact(figure, subj.colors[part]).any(), (s.key, subj.name, part)
