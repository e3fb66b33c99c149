"""The OpenAI-compatible backend against a real HTTP server on 127.0.0.1 with scripted answers and faults."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from cag.data.sample import Grounding, Sample
from cag.grounding import GroundingPipeline, OpenAIBackend, PromptTemplates, build_report
from experiments.benchmarks.fake_chat_api import OpenAICompatServer, Reply

NAMES = ["Ana", "Bea", "Cyd", "Dov", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo"]
# HTTP calls each sample costs with max_retries=2 (first answer accepted ends a request).
EXPECTED_CALLS = {
    "Ana": 2,
    "Bea": 2,
    "Cyd": 2,
    "Dov": 3,
    "Eli": 2,
    "Fay": 2,
    "Gus": 3,
    "Hal": 4,
    "Ivy": 3,
    "Jo": 4,
}


def make_sample(i: int, name: str) -> Sample:
    refs = [Image.new("RGB", (64, 48), (40 * i % 255, 90, 160)), Image.new("RGB", (80, 40), (200, 200, 30))]
    text = f"Medium shot. {name} (Fig.1) waves, wearing a red hat. The background is a park (Fig.2)."
    return Sample(key=f"s{i:02d}", references=refs, instruction=text)


def good_phrases(name: str) -> list[str]:
    return [f"{name} (Fig.1)", "red hat", "a park (Fig.2)"]


def good_boxes(name: str) -> list[dict[str, Any]]:
    return [
        {"image_id": "1", "bbox_2d": [100, 50, 900, 990], "label": f"{name} (Fig.1)"},
        {"image_id": "1", "bbox_2d": [300, 40, 700, 200], "label": "red hat"},
        {"image_id": 2, "bbox_2d": [0, 0, 1000, 1000], "label": "a park (Fig.2)"},
    ]


def expected_groundings(name: str) -> list[Grounding]:
    return [
        Grounding(b["label"], int(b["image_id"]), tuple(float(v) for v in b["bbox_2d"]))
        for b in good_boxes(name)
    ]


class ScriptedVLM:
    """Responder that recognises the sample by the character's name in the prompt and misbehaves on cue."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: Counter[tuple[str, str]] = Counter()

    def __call__(self, body: dict[str, Any], call_index: int) -> Reply:
        parts = body["messages"][0]["content"]
        text = parts[-1]["text"]
        stage = "boxes" if "Draw a bounding box" in text else "phrases"
        tail = text[-400:]
        name = next(n for n in NAMES if f"{n} (Fig.1)" in tail)
        with self.lock:
            self.seen[(name, stage)] += 1
            n_call = self.seen[(name, stage)]
        return self.reply(name, stage, n_call)

    def reply(self, name: str, stage: str, n: int) -> Reply:
        phrases, boxes = good_phrases(name), good_boxes(name)
        if stage == "phrases":
            if name == "Bea":
                return Reply.answer("```json\n" + json.dumps(phrases) + "\n```")
            if name == "Cyd":
                return Reply.answer(
                    f"Sure! The names, in order, are: {phrases!r}. Let me know if you need more."
                )
            if name == "Dov":
                return Reply.answer("Dov is wearing a red hat in a park.")
            if name == "Fay":
                return Reply.answer(json.dumps([*phrases, "blue scarf"]))
            if name == "Gus" and n == 1:
                return Reply.http_error(429, "Rate limit reached", code="rate_limit_exceeded", retry_after=0)
            if name == "Ivy":
                return Reply.http_error(500, "The server had an error")
            return Reply.answer(json.dumps(phrases))
        if name == "Bea":
            return Reply.answer("```json\n" + json.dumps(boxes, indent=2) + "\n```")
        if name == "Cyd":
            return Reply.answer(
                "Here are the boxes:\n```\n" + json.dumps(boxes) + "\n```\nEach box is [x1, y1, x2, y2]."
            )
        if name == "Eli":
            return Reply.answer(json.dumps([{**b, "image_id": "5"} for b in boxes]))
        if name == "Fay":
            bad = dict(boxes[1], bbox_2d=[700, 40, 300, 200])
            return Reply.answer(json.dumps([boxes[0], bad, boxes[2]]))
        if name == "Hal" and n <= 2:
            return Reply.http_error(500, "The server had an error")
        if name == "Jo":
            return Reply.answer('{"image_id": "1", "bbox_2d": [1, 2,')
        return Reply.answer(json.dumps(boxes))


def make_backend(server: OpenAICompatServer, **kw: Any) -> OpenAIBackend:
    args: dict[str, Any] = dict(
        base_url=server.base_url,
        api_key_env="CAG_TEST_UNSET_KEY",
        max_concurrency=4,
        max_retries=2,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        timeout_s=10,
    )
    args.update(kw)
    return OpenAIBackend("qwen3-vl-test", **args)


@pytest.fixture()
def samples() -> list[Sample]:
    return [make_sample(i, n) for i, n in enumerate(NAMES)]


def reasons(res: Any) -> set[str]:
    return {r.reason for r in res.rejections}


def test_good_answers_grounded_bad_ones_recorded_with_reasons(tmp_path, samples) -> None:
    with OpenAICompatServer(ScriptedVLM()) as server:
        backend = make_backend(server)
        results = GroundingPipeline(backend, PromptTemplates.load(), tmp_path / "r.jsonl", chunk_size=4).run(
            samples
        )
        assert len(server.calls) == sum(EXPECTED_CALLS.values())
        assert backend.calls_made == len(server.calls)

    by_name = {n: results[f"s{i:02d}"] for i, n in enumerate(NAMES)}
    for name in ("Ana", "Bea", "Cyd", "Gus", "Hal"):  # plain, fenced, prose, after a 429, after two 500s
        r = by_name[name]
        assert r.status == "full", (name, r.rejections)
        assert r.groundings == expected_groundings(name)
        assert r.phrases == good_phrases(name)
        assert r.calls == EXPECTED_CALLS[name]

    assert by_name["Dov"].status == "none" and reasons(by_name["Dov"]) == {"unparsable_answer"}
    assert by_name["Eli"].status == "none"
    assert reasons(by_name["Eli"]) == {"image_id_out_of_range", "phrase_not_located"}
    fay = by_name["Fay"]
    assert fay.status == "partial"
    assert [g.phrase for g in fay.groundings] == ["Fay (Fig.1)", "a park (Fig.2)"]
    assert reasons(fay) == {"phrase_not_in_instruction", "degenerate_bbox", "phrase_not_located"}
    ivy = by_name["Ivy"]
    assert ivy.status == "none" and ivy.failed and reasons(ivy) == {"request_failed"}
    assert "HTTP 500" in ivy.rejections[0].detail
    jo = by_name["Jo"]
    assert jo.phrases == good_phrases("Jo") and reasons(jo) == {"unparsable_answer"} and jo.raw["boxes"]

    report = build_report(results.values())
    assert (report["grounded_fully"], report["grounded_partly"], report["not_grounded"]) == (5, 1, 4)
    assert report["rejection_reasons"]["unparsable_answer"] == 2

    # Every sample, grounded or not, is on disk with its reasons.
    lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert sorted(x["key"] for x in lines) == sorted(s.key for s in samples)
    assert {x["key"]: x["status"] for x in lines}["s03"] == "none"


def interrupted(samples: list[Sample], after: int) -> Iterator[Sample]:
    """The input stream dies (Ctrl-C, pre-emption) after ``after`` samples."""
    yield from samples[:after]
    raise KeyboardInterrupt


def test_resume_after_interruption_makes_no_repeat_calls(tmp_path, samples) -> None:
    path = tmp_path / "results.jsonl"
    templates = PromptTemplates.load()
    with OpenAICompatServer(ScriptedVLM()) as server:
        with pytest.raises(KeyboardInterrupt):
            GroundingPipeline(make_backend(server), templates, path, chunk_size=2).run(
                interrupted(samples, 5)
            )
        first = len(server.calls)
        # Chunks of two: samples 0-3 finished, sample 4 was read but never asked.
        assert first == sum(EXPECTED_CALLS[n] for n in NAMES[:4])
        assert len(path.read_text().splitlines()) == 4

        server.reset_calls()
        pipe = GroundingPipeline(make_backend(server), templates, path, chunk_size=2)
        results = pipe.run(samples)
        assert pipe.skipped == 4
        assert len(server.calls) == sum(EXPECTED_CALLS[n] for n in NAMES[4:])
        called = {c["messages"][0]["content"][-1]["text"][-400:] for c in server.calls}
        assert not any(f"{n} (Fig.1)" in t for t in called for n in NAMES[:4])
        assert results["s00"].groundings == expected_groundings("Ana")

        server.reset_calls()
        again = GroundingPipeline(make_backend(server), templates, path, chunk_size=2)
        assert again.run(samples).keys() == results.keys()
        assert len(server.calls) == 0
    assert len(path.read_text().splitlines()) == len(samples)


def test_changed_model_or_prompt_is_not_served_from_the_results_file(tmp_path, samples) -> None:
    path = tmp_path / "results.jsonl"
    with OpenAICompatServer(ScriptedVLM()) as server:
        GroundingPipeline(make_backend(server), PromptTemplates.load(), path).run(samples[:1])
        server.reset_calls()
        other = OpenAIBackend("another-model", base_url=server.base_url, api_key_env="CAG_TEST_UNSET_KEY")
        GroundingPipeline(other, PromptTemplates.load(), path).run(samples[:1])
        assert len(server.calls) == 2


def test_torn_last_line_from_a_killed_run_is_dropped_and_that_sample_redone(tmp_path, samples) -> None:
    path = tmp_path / "results.jsonl"
    templates = PromptTemplates.load()
    with OpenAICompatServer(ScriptedVLM()) as server:
        GroundingPipeline(make_backend(server), templates, path).run(samples[:2])
        lines = path.read_bytes().splitlines(keepends=True)
        torn_key = json.loads(lines[-1])["key"]  # results are written as they finish, in either order
        path.write_bytes(b"".join(lines[:-1]) + b'{"format": 1, "key": "' + torn_key.encode() + b'", "cac')
        server.reset_calls()
        results = GroundingPipeline(make_backend(server), templates, path).run(samples[:2])
        assert len(server.calls) == EXPECTED_CALLS[{"s00": "Ana", "s01": "Bea"}[torn_key]]
        assert results[torn_key].status == "full"
    assert sorted(json.loads(x)["key"] for x in path.read_text().splitlines()) == ["s00", "s01"]


def test_retry_failed_asks_again_only_for_failed_requests(tmp_path, samples) -> None:
    path = tmp_path / "results.jsonl"
    subset = [samples[0], samples[8]]  # Ana grounded, Ivy failed on HTTP 500
    with OpenAICompatServer(ScriptedVLM()) as server:
        GroundingPipeline(make_backend(server), PromptTemplates.load(), path).run(subset)
        server.reset_calls()
        GroundingPipeline(make_backend(server), PromptTemplates.load(), path, retry_failed=True).run(subset)
        assert len(server.calls) == EXPECTED_CALLS["Ivy"]


def test_absolute_pixel_answers_of_a_qwen25_style_server_become_relative_boxes(tmp_path) -> None:
    sample = Sample(
        "abs0",
        [Image.new("RGB", (1000, 700)), Image.new("RGB", (300, 300))],
        "Ana (Fig.1) in a park (Fig.2).",
    )

    def responder(body: dict[str, Any], i: int) -> Reply:
        text = body["messages"][0]["content"][-1]["text"]
        if "Draw a bounding box" not in text:
            return Reply.answer('["Ana (Fig.1)", "a park (Fig.2)"]')
        # Pixels of the resized inputs: 1008x700 and 308x308.
        return Reply.answer(
            '[{"bbox_2d": [252, 175, 756, 700], "label": "Ana (Fig.1)", "image_id": 1},'
            ' {"bbox_2d": [0, 0, 308, 154], "label": "a park (Fig.2)", "image_id": 2}]'
        )

    with OpenAICompatServer(responder) as server:
        backend = make_backend(server, coords="absolute")
        res = GroundingPipeline(backend, PromptTemplates.load(), tmp_path / "r.jsonl").run([sample])["abs0"]
    assert [g.bbox_2d for g in res.groundings] == [
        pytest.approx((250.0, 250.0, 750.0, 1000.0)),
        pytest.approx((0.0, 0.0, 1000.0, 500.0)),
    ]


def test_repeated_sample_key_is_asked_once(tmp_path, samples) -> None:
    with OpenAICompatServer(ScriptedVLM()) as server:
        results = GroundingPipeline(make_backend(server), PromptTemplates.load(), tmp_path / "r.jsonl").run(
            [samples[0], samples[1], samples[0]]
        )
        assert len(server.calls) == EXPECTED_CALLS["Ana"] + EXPECTED_CALLS["Bea"]
    assert list(results) == ["s00", "s01"]
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 2
