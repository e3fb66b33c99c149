"""Shard writing and reading: exact round trip, and bad data skipped, reported and counted."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from torch.utils.data import DataLoader

from cag.data.sample import Grounding, Sample
from cag.data.shards import (
    ShardSampleError,
    brace_urls,
    existing_shards,
    iter_shard_samples,
    sample_from_wds,
    sample_to_wds,
    write_shards,
)

MARKER_NAME = "unpickled.marker"


def _touch(path: str) -> None:
    Path(path).touch()


class _Payload:
    """Unpickling this creates a marker file: proof of whether anything was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


def _assert_same(a: Sample, b: Sample) -> None:
    assert a.key == b.key
    assert a.instruction == b.instruction
    assert a.groundings == b.groundings
    assert a.task_type == b.task_type
    assert a.truth == b.truth
    assert len(a.references) == len(b.references)
    for ra, rb in zip(a.references, b.references, strict=True):
        assert ra.size == rb.size and rb.mode == "RGB"
        assert np.array_equal(np.asarray(ra), np.asarray(rb))
    assert (a.target is None) == (b.target is None)
    if a.target is not None:
        assert np.array_equal(np.asarray(a.target), np.asarray(b.target))


def test_round_trip_returns_every_field_and_identical_pixels(shard_dir, small_samples):
    _, summary = shard_dir
    read = list(iter_shard_samples(brace_urls(summary.shards)))
    assert [s.key for s in read] == [s.key for s in small_samples]
    for written, got in zip(small_samples, read, strict=True):
        _assert_same(written, got)
    assert {len(s.references) for s in read} == {2, 3, 4}


def test_sample_without_target_round_trips_without_one(tmp_path, small_samples):
    s = small_samples[0]
    bare = Sample(s.key, s.references, s.instruction, s.groundings, None, "multi_character", None)
    summary = write_shards([bare], str(tmp_path / "s-%06d.tar"))
    (got,) = list(iter_shard_samples(summary.shards))
    _assert_same(bare, got)


def test_same_samples_give_byte_identical_shards(tmp_path, small_samples):
    a = write_shards(small_samples, str(tmp_path / "a" / "s-%06d.tar"), maxcount=5)
    b = write_shards(small_samples, str(tmp_path / "b" / "s-%06d.tar"), maxcount=5)
    assert [Path(p).read_bytes() for p in a.shards] == [Path(p).read_bytes() for p in b.shards]


def test_member_names_keep_the_key_before_the_first_dot(shard_dir, small_samples):
    _, summary = shard_dir
    with tarfile.open(summary.shards[0]) as tar:
        names = tar.getnames()
    first = small_samples[0]
    expected = {f"{first.key}.json", f"{first.key}.target.png"} | {
        f"{first.key}.ref{i}.png" for i in range(len(first.references))
    }
    assert expected <= set(names)
    assert all(name.split(".", 1)[0].startswith("train-") for name in names)


def test_writer_splits_by_maxcount_and_summarises(shard_dir):
    folder, summary = shard_dir
    assert [Path(p).name for p in summary.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert summary.bytes_written == sum(Path(p).stat().st_size for p in summary.shards)
    assert brace_urls(summary.shards) == str(folder / "shard-{000000..000002}.tar")
    assert existing_shards(str(folder / "shard-%06d.tar")) == summary.shards
    counts = [sum(1 for n in tarfile.open(p).getnames() if n.endswith(".json")) for p in summary.shards]
    assert counts == [5, 5, 2]
    report = summary.to_json()
    assert report["written"] == 12 and report["rejected"] == 0 and report["num_shards"] == 3


def test_writer_rejects_bad_and_duplicate_samples_and_writes_the_rest(tmp_path, small_samples, caplog):
    good = small_samples[:3]
    s = small_samples[3]
    dotted = Sample("bad.key", s.references, s.instruction, s.groundings, s.target)
    wrong_ref = Sample("wrong-ref", s.references, s.instruction,
                       [Grounding(s.groundings[0].phrase, 9, (0.0, 0.0, 10.0, 10.0))], s.target)
    odd_truth = dataclasses.replace(s.truth, image_size=(np.int64(64), 64))  # numpy numbers are not JSON
    unserialisable = Sample("odd-truth", s.references, s.instruction, s.groundings, s.target, truth=odd_truth)
    with caplog.at_level(logging.WARNING, logger="cag.data.shards"):
        summary = write_shards([good[0], dotted, good[1], wrong_ref, good[0], unserialisable, good[2]],
                               str(tmp_path / "s-%06d.tar"))
    assert summary.written == 3
    assert [r["key"] for r in summary.rejected] == ["bad.key", "wrong-ref", good[0].key, "odd-truth"]
    assert "dot" in summary.rejected[0]["reason"]
    assert "image_id=9" in summary.rejected[1]["reason"]
    assert summary.rejected[2]["reason"].startswith("duplicate_key")
    assert "JSON serializable" in summary.rejected[3]["reason"]
    assert summary.rejected_by_reason == {"invalid_sample": 3, "duplicate_key": 1}
    assert "wrong-ref" in caplog.text
    assert [x.key for x in iter_shard_samples(summary.shards)] == [g.key for g in good]


def test_writer_refuses_a_pattern_without_a_shard_number(tmp_path, small_samples):
    with pytest.raises(ValueError, match="needs .*integer field"):
        write_shards(small_samples, str(tmp_path / "shard.tar"))


def _write_records(path: Path, records: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False, mtime=0.0) as tw:
        for rec in records:
            tw.write(rec)


def _bad_records(samples: list[Sample], tmp_path: Path) -> tuple[list[dict], dict[str, str]]:
    """Good records interleaved with one broken record per failure kind; returns (records, key -> kind)."""
    recs = [sample_to_wds(s) for s in samples[:8]]
    missing = recs[1]
    del missing["target.png"]
    recs[2]["ref0.png"] = b"\x89PNG\r\n\x1a\n this is not an image"
    meta = json.loads(recs[3]["json"])
    meta["groundings"][0]["image_id"] = meta["num_references"] + 1
    recs[3]["json"] = json.dumps(meta).encode()
    meta = json.loads(recs[4]["json"])
    meta["groundings"][-1]["bbox_2d"] = [10, 10, 1200, 500]
    recs[4]["json"] = json.dumps(meta).encode()
    recs[5]["weights.pth"] = pickle.dumps(_Payload(tmp_path / MARKER_NAME))
    recs[6]["json"] = b"{not json"
    kinds = {
        samples[1].key: "missing_member",
        samples[2].key: "undecodable_image",
        samples[3].key: "bad_grounding",
        samples[4].key: "bad_grounding",
        samples[5].key: "pickle_refused",
        samples[6].key: "bad_json",
    }
    return recs, kinds


def test_corrupt_shards_skip_only_the_bad_samples_and_report_shard_and_key(tmp_path, small_samples, caplog):
    good_pattern = str(tmp_path / "good-%06d.tar")
    good = write_shards(small_samples[:5], good_pattern, maxcount=5).shards[0]
    records, kinds = _bad_records(small_samples, tmp_path)
    bad = tmp_path / "bad-000000.tar"
    _write_records(bad, records)
    # a truncated copy of a good shard, cut in the middle of the fourth sample's target
    truncated = tmp_path / "trunc-000000.tar"
    full = write_shards(small_samples[8:12], str(tmp_path / "full-%06d.tar")).shards[0]
    with tarfile.open(full) as tar:
        members = tar.getmembers()
    cut_member = next(m for m in members if m.name == f"{small_samples[11].key}.target.png")
    cut = cut_member.offset_data + cut_member.size // 2
    truncated.write_bytes(Path(full).read_bytes()[:cut])
    complete = {m.name.split(".", 1)[0] for m in members if m.offset_data + m.size <= cut}
    complete_keys = [s.key for s in small_samples[8:12] if s.key in complete and s.key != small_samples[11].key]

    errors: list[tuple[str, str, str]] = []
    with caplog.at_level(logging.WARNING, logger="cag.data.shards"):
        pipeline = iter_shard_samples([good, str(bad), str(truncated), str(tmp_path / "missing-000000.tar")],
                                      on_error=lambda *e: errors.append(e))
        got = [s.key for s in pipeline]

    expected_good = ([s.key for s in small_samples[:5]] + [small_samples[0].key, small_samples[7].key]
                     + complete_keys)
    assert got == expected_good
    assert not (tmp_path / MARKER_NAME).exists(), "a shard member was unpickled"
    by_key = {key: (shard, reason) for shard, key, reason in errors}
    for key, kind in kinds.items():
        assert by_key[key][0] == str(bad), key
        assert by_key[key][1].startswith(kind), (key, by_key[key])
        assert key in caplog.text
    assert "weights.pth" in by_key[small_samples[5].key][1]
    trunc_errors = [e for e in errors if e[0] == str(truncated)]
    assert [r.split(":")[0] for _, _, r in trunc_errors] == ["truncated_tar", "missing_member"]
    assert (str(truncated), small_samples[11].key) in {(e[0], e[1]) for e in trunc_errors}
    assert any(e[0].endswith("missing-000000.tar") and e[2].startswith("unreadable_shard") for e in errors)
    assert pipeline.stats.good == len(expected_good)
    assert pipeline.stats.bad == len(errors)
    assert pipeline.stats.skipped["bad_grounding"] == 2 and pipeline.stats.skipped["pickle_refused"] == 1


def test_control_the_payload_does_run_when_unpickled(tmp_path):
    # Makes the previous test meaningful: the marker appears if anything unpickles the member.
    pickle.loads(pickle.dumps(_Payload(tmp_path / MARKER_NAME)))
    assert (tmp_path / MARKER_NAME).exists()


def _without_subject_colours(meta: bytes) -> bytes:
    obj = json.loads(meta)
    del obj["truth"]["subjects"][0]["colors"]
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("mutate", "kind", "detail"),
    [
        (lambda r: r.pop("json"), "missing_member", "json"),
        (lambda r: r.pop("ref1.png"), "missing_member", "ref1.png"),
        (lambda r: r.__setitem__("target.png", b"garbage"), "undecodable_image", "target.png"),
        (lambda r: r.__setitem__("extra.pkl", b"x"), "pickle_refused", "extra.pkl"),
        (lambda r: r.__setitem__("ref9.png", r["ref0.png"]), "bad_json", "ref9.png"),
        (lambda r: r.__setitem__("json", _without_subject_colours(r["json"])), "bad_json", "colors"),
    ],
)
def test_sample_from_wds_names_shard_key_and_culprit(small_samples, mutate, kind, detail):
    rec = sample_to_wds(small_samples[1])
    rec["__url__"] = "data/shards/x-000003.tar"
    mutate(rec)
    with pytest.raises(ShardSampleError) as err:
        sample_from_wds(rec)
    msg = str(err.value)
    assert err.value.kind == kind
    assert "data/shards/x-000003.tar" in msg and small_samples[1].key in msg and detail in msg


def test_sample_from_wds_accepts_already_decoded_values(small_samples):
    s = small_samples[2]
    rec = sample_to_wds(s)
    rec["json"] = json.loads(rec["json"])
    rec["ref0.png"] = s.references[0]
    _assert_same(s, sample_from_wds(rec))


def test_two_workers_read_every_sample_exactly_once(tmp_path, small_samples):
    summary = write_shards(small_samples, str(tmp_path / "s-%06d.tar"), maxcount=3)
    assert len(summary.shards) == 4
    loader = DataLoader(iter_shard_samples(summary.shards), batch_size=None, num_workers=2,
                        collate_fn=lambda s: s)
    keys = [s.key for s in loader]
    assert sorted(keys) == sorted(s.key for s in small_samples)


def test_resampled_stream_runs_for_the_requested_epoch_length(shard_dir):
    _, summary = shard_dir
    pipeline = iter_shard_samples(summary.shards, resampled=True, shuffle=8).with_epoch(30)
    keys = [s.key for s in pipeline]
    assert len(keys) == 30
    assert len(set(keys)) > 5


def test_shuffle_keeps_the_samples_but_changes_their_order(shard_dir, small_samples):
    _, summary = shard_dir
    orders = {tuple(s.key for s in iter_shard_samples(summary.shards, shuffle=12, seed=seed)) for seed in range(4)}
    assert all(sorted(o) == sorted(s.key for s in small_samples) for o in orders)
    assert len(orders) > 1  # another seed, another order
    again = {tuple(s.key for s in iter_shard_samples(summary.shards, shuffle=12, seed=2)) for _ in range(3)}
    assert len(again) == 1  # the same seed, the same order: runs repeat and resume exactly


@pytest.mark.parametrize("where", ["inside_member_data", "at_member_header", "inside_member_header"])
def test_truncation_is_reported_wherever_the_cut_falls(tmp_path, small_samples, where):
    full = write_shards(small_samples[:4], str(tmp_path / "f-%06d.tar")).shards[0]
    with tarfile.open(full) as tar:
        member = next(m for m in tar.getmembers() if m.name == f"{small_samples[3].key}.json")
    cut = {
        "inside_member_data": member.offset_data + member.size // 2,
        "at_member_header": member.offset,  # reads as a valid, shorter archive without the check
        "inside_member_header": member.offset + 100,
    }[where]
    cut_path = tmp_path / "cut-000000.tar"
    cut_path.write_bytes(Path(full).read_bytes()[:cut])
    errors: list[tuple[str, str, str]] = []
    got = [s.key for s in iter_shard_samples(str(cut_path), on_error=lambda *e: errors.append(e))]
    assert got == [s.key for s in small_samples[:3]]
    assert len(errors) == 1 and errors[0][0] == str(cut_path) and errors[0][2].startswith("truncated_tar")
