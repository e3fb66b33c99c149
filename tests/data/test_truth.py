"""The typed truth record: the generator's truth survives its JSON form, and a malformed one is named."""

from __future__ import annotations

import copy
import json

import pytest

from cag.data.synthetic import SyntheticConfig, generate_split
from cag.data.truth import Truth, TruthError

CFG = SyntheticConfig(image_size=64, num_characters=[1, 3], seed=1)


@pytest.fixture(scope="module")
def raw() -> dict:
    """One generator truth as shards store it (through real JSON text)."""
    sample = next(generate_split("test", 1, CFG))
    return json.loads(json.dumps(sample.truth.to_dict()))


def test_generator_truth_round_trips_through_json_unchanged():
    for sample in generate_split("test", 12, CFG):
        on_disk = json.loads(json.dumps(sample.truth.to_dict()))
        back = Truth.from_dict(on_disk)
        assert back == sample.truth
        assert back.to_dict() == on_disk  # the stored JSON keeps its exact form (ints stay ints)


@pytest.mark.parametrize(
    ("break_it", "named"),
    [
        (lambda d: d.pop("subjects"), "'subjects'"),
        (lambda d: d.pop("scene"), "'scene'"),
        (lambda d: d["subjects"][0].pop("colors"), "'colors'"),
        (lambda d: d["subjects"][0].__setitem__("target_bbox_2d", [1, 2, 3]), "target_bbox_2d"),
        (lambda d: d["subjects"][0].__setitem__("image_id", "1"), "image_id"),
        (lambda d: d["subjects"][0]["colors"].__setitem__("hair", "red"), "hair"),
        (lambda d: d["scene"]["props"][0].pop("color"), "'color'"),
        (lambda d: d["scene"].__setitem__("props", "tent"), "props"),
    ],
)
def test_malformed_truth_is_refused_naming_the_key(raw, break_it, named):
    bad = copy.deepcopy(raw)
    break_it(bad)
    with pytest.raises(TruthError, match=named):
        Truth.from_dict(bad)


def test_truth_that_is_not_an_object_is_refused():
    with pytest.raises(TruthError, match="list"):
        Truth.from_dict([1, 2])
