"""The PF / SC judge end to end: real HTTP server, real openai client, injected faults."""

from __future__ import annotations

import base64
import json
import re
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from cag.remote.chat import ChatClient
from evaluation import prompts
from evaluation.aggregate import summarize
from evaluation.judge import JudgeItem, JudgeRecord, judge_items, parse_score, write_jsonl
from experiments.benchmarks.fake_chat_api import FaultInjector, OpenAICompatServer, Reply

FAKE_KEY = "sk-judge-LEAKCANARY-19d2e77a"
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 30)]


@pytest.fixture(autouse=True)
def _fake_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)


def expected(idx: int, criterion: str) -> int:
    return idx % 11 if criterion == "PF" else (3 * idx + 4) % 11


def criterion_of(body: dict[str, Any]) -> str:
    system = body["messages"][0]["content"]
    return "PF" if "PROMPT FOLLOWING" in system else "SC"


def index_of(body: dict[str, Any]) -> int:
    first_text = body["messages"][1]["content"][0]["text"]
    match = re.search(r"sample (\d+)", first_text)
    assert match, first_text
    return int(match.group(1))


def oracle(body: dict[str, Any], call_index: int) -> Reply:
    """A deterministic 'judge' whose score encodes which sample and criterion it saw."""
    c, i = criterion_of(body), index_of(body)
    return Reply.answer(
        json.dumps({"score": expected(i, c), "reasoning": f"{c} of sample {i}"}), model="judge-x"
    )


def make_items(n: int, n_refs: int = 2) -> list[JudgeItem]:
    refs = [Image.new("RGB", (12, 12), c) for c in COLORS]
    return [
        JudgeItem(
            key=f"s{i:04d}",
            instruction=f"sample {i}: put Fig. 1 next to Fig. 2",
            references=refs[:n_refs],
            generated=Image.new("RGB", (16, 16), (i % 256, 0, 0)),
            task_type=("multi_subject", "scene")[i % 2],
        )
        for i in range(n)
    ]


def client_for(server: OpenAICompatServer, **kw: Any) -> ChatClient:
    opts: dict[str, Any] = dict(backoff_base_s=0.005, backoff_max_s=0.02, max_retries=4)
    opts.update(kw)
    return ChatClient("gpt-judge", base_url=server.base_url, **opts)


def test_300_samples_with_faults_all_scored_cheaply_and_rerun_is_free(tmp_path: Path) -> None:
    faults = FaultInjector(
        oracle, p429=0.1, p500=0.1, p_malformed=0.1, latency_s=(0.0, 0.004), retry_after_s=0.01, seed=7
    )
    items = make_items(300)
    with OpenAICompatServer(faults) as server:
        # A generous retry budget so that no sample fails by bad luck (0.3**11 per request).
        client = client_for(server, cache_dir=tmp_path / "cache", max_retries=10, max_concurrency=16)
        streamed: list[JudgeRecord] = []
        records = judge_items(items, client, on_result=streamed.append)
        calls_first = len(server.calls)
        assert faults.injected["429"] > 0 and faults.injected["500"] > 0 and faults.injected["malformed"] > 0

        assert [r.key for r in records] == [it.key for it in items]
        assert sorted(r.key for r in streamed) == sorted(it.key for it in items)
        for i, rec in enumerate(records):
            assert rec.status == {"PF": "ok", "SC": "ok"}
            assert rec.pf == expected(i, "PF") and rec.sc == expected(i, "SC")
            assert rec.reasoning["SC"] == f"SC of sample {i}"
            assert rec.model_reported["PF"] == "judge-x"
            assert rec.scores()["overall"] == pytest.approx((rec.pf * rec.sc) ** 0.5)
        calls_per_criterion_per_sample = calls_first / (len(items) * 2)
        assert calls_per_criterion_per_sample <= 2.2
        assert sum(sum(r.attempts.values()) for r in records) == calls_first == client.calls_made

        server.reset_calls()
        again = judge_items(items, client_for(server, cache_dir=tmp_path / "cache"))
        assert server.calls == []
        assert [(r.pf, r.sc) for r in again] == [(r.pf, r.sc) for r in records]
        assert all(r.cached == {"PF": True, "SC": True} and r.attempts == {"PF": 0, "SC": 0} for r in again)


def test_message_order_is_instruction_references_then_generated_image() -> None:
    item = make_items(1, n_refs=3)[0]
    with OpenAICompatServer(oracle) as server:
        judge_items([item], client_for(server), criteria=("SC",))
        (body,) = server.calls
    system, user = body["messages"]
    assert system["role"] == "system" and "SUBJECT CONSISTENCY" in system["content"]
    assert '{"score"' in system["content"]
    kinds = [(p["type"], p.get("text")) for p in user["content"]]
    assert kinds == [
        ("text", f"Instruction: {item.instruction}"),
        ("text", "Fig. 1:"),
        ("image_url", None),
        ("text", "Fig. 2:"),
        ("image_url", None),
        ("text", "Fig. 3:"),
        ("image_url", None),
        ("text", prompts.GENERATED_LABEL),
        ("image_url", None),
    ]
    assert user["content"][-1]["image_url"]["url"].startswith("data:image/png;base64,")


def test_pf_and_sc_use_different_rubrics_and_scene_index() -> None:
    assert "identity is scored separately" in prompts.system_prompt("PF")
    assert "Fig. 3 is the scene reference" in prompts.system_prompt("SC", scene_ref=3)
    assert prompts.system_prompt("PF") != prompts.system_prompt("SC")
    with pytest.raises(ValueError):
        prompts.system_prompt("AES")


@pytest.mark.parametrize(
    "text, score",
    [
        ('{"score": 7, "reasoning": "fine"}', 7.0),
        ('```json\n{"score": 6.5, "reasoning": "ok"}\n```', 6.5),
        ('Here is my verdict:\n{"score": 3, "reasoning": "two subjects missing"}\nThanks.', 3.0),
        ('Looking at {the image}... {"reasoning": "x", "score": "8"}', 8.0),
        ('{"score": 0, "reasoning": "unrelated"}', 0.0),
        ('{"score": 10}', 10.0),
        ("```json\n{'score': 5, 'reasoning': 'single quotes',}\n```", 5.0),  # read like grounding answers
        ('[{"score": 2, "reasoning": "wrapped in a list"}]', 2.0),
    ],
)
def test_parse_score_accepts_wrapped_json(text: str, score: float) -> None:
    assert parse_score(text).score == score


@pytest.mark.parametrize(
    "text",
    [
        '{"score": 11, "reasoning": "too high"}',
        '{"score": -1}',
        '{"score": NaN}',
        '{"score": true}',
        '{"score": "great"}',
        '{"reasoning": "no score"}',
        "I would give it a 7.",
        '{"score": 4} or maybe {"score": 6}',
        "",
    ],
)
def test_parse_score_rejects_invalid_answers(text: str) -> None:
    with pytest.raises(ValueError):
        parse_score(text)


def test_out_of_range_score_is_retried_and_fenced_answer_parsed_over_http() -> None:
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def responder(body: dict[str, Any], i: int) -> Reply:
        c = criterion_of(body)
        with lock:
            seen[c] = seen.get(c, 0) + 1
            k = seen[c]
        if k == 1:
            return Reply.answer('{"score": 12, "reasoning": "over the top"}')
        return Reply.answer('Sure!\n```json\n{"score": 8, "reasoning": "good"}\n```')

    with OpenAICompatServer(responder) as server:
        (rec,) = judge_items(make_items(1), client_for(server))
    assert rec.pf == 8.0 and rec.sc == 8.0
    assert rec.attempts == {"PF": 2, "SC": 2}
    assert rec.raw["PF"][0] == '{"score": 12, "reasoning": "over the top"}'


def test_permanent_500_fails_with_reason_and_no_score(tmp_path: Path) -> None:
    with OpenAICompatServer(lambda b, i: Reply.http_error(500, "model overloaded")) as server:
        records = judge_items(make_items(3), client_for(server, max_retries=2))
        assert len(server.calls) == 3 * 2 * 3
    for rec in records:
        assert rec.pf is None and rec.sc is None
        assert rec.status == {"PF": "failed", "SC": "failed"}
        assert "model overloaded" in (rec.error["PF"] or "")
    write_jsonl(records, tmp_path / "j.jsonl")
    reloaded = [json.loads(line) for line in (tmp_path / "j.jsonl").read_text().splitlines()]
    assert reloaded[0]["pf"] is None
    s = summarize(reloaded)  # the file's lines are summarize's input as they are
    assert s["PF"] is None and s["Overall"] is None
    assert s["coverage"] == {"PF": 0.0, "SC": 0.0, "Overall": 0.0}
    assert s["failed"] == {"PF": 3, "SC": 3}


def test_content_filter_is_recorded_as_refused() -> None:
    def responder(body: dict[str, Any], i: int) -> Reply:
        if criterion_of(body) == "SC":
            return Reply.answer("", finish_reason="content_filter")
        return oracle(body, i)

    with OpenAICompatServer(responder) as server:
        records = judge_items(make_items(4), client_for(server))
        assert len(server.calls) == 8
    assert all(r.status == {"PF": "ok", "SC": "refused"} and r.sc is None for r in records)
    s = summarize(records)
    assert s["refused"]["SC"] == 4 and s["excluded_from_overall"] == 4 and s["Overall"] is None
    assert s["coverage"]["PF"] == 1.0
    assert records[2].scores() == {"pf": expected(2, "PF"), "sc": None, "overall": None}
    assert records[2].details()["judge_status"] == {"PF": "ok", "SC": "refused"}


def test_api_key_never_reaches_cache_or_results(tmp_path: Path) -> None:
    with OpenAICompatServer(oracle) as server:
        records = judge_items(make_items(4), client_for(server, cache_dir=tmp_path / "cache"))
        assert server.call_headers[0]["authorization"] == f"Bearer {FAKE_KEY}"
    write_jsonl(records, tmp_path / "judge.jsonl")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 1 + 8
    for f in files:
        assert FAKE_KEY not in f.read_text()
    assert FAKE_KEY not in repr(records)


def test_duplicate_keys_and_unknown_criteria_are_rejected() -> None:
    items = make_items(2)
    items[1].key = items[0].key
    with OpenAICompatServer(oracle) as server:
        client = client_for(server)
        with pytest.raises(ValueError, match="unique"):
            judge_items(items, client)
        with pytest.raises(ValueError, match="criteria"):
            judge_items(make_items(1), client, criteria=("PF", "AES"))
        assert server.calls == []


def test_path_inputs_are_sent_byte_for_byte(tmp_path: Path) -> None:
    ref = tmp_path / "ref.png"
    gen = tmp_path / "gen.jpg"
    Image.new("RGB", (9, 9), (1, 2, 3)).save(ref)
    Image.new("RGB", (9, 9), (4, 5, 6)).save(gen)
    item = JudgeItem("p", "sample 5", [ref], gen)
    with OpenAICompatServer(oracle) as server:
        (rec,) = judge_items([item], client_for(server), criteria=("PF",))
        body = server.calls[0]

    url = body["messages"][1]["content"][-1]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == gen.read_bytes()
    assert rec.pf == expected(5, "PF") and rec.sc is None and "SC" not in rec.status


def test_shipped_judge_configs_build_a_client_and_judge(tmp_path: Path) -> None:

    configs = sorted(Path(__file__).resolve().parents[2].glob("conf/evaluation/judge/*.yaml"))
    assert configs, "no judge configs found"
    for path in configs:
        cfg = yaml.safe_load(path.read_text())
        with OpenAICompatServer(oracle) as server:
            client_cfg = dict(cfg["client"], base_url=server.base_url, cache_dir=str(tmp_path / path.stem))
            client = ChatClient(**client_cfg)
            (rec,) = judge_items(
                make_items(1),
                client,
                criteria=cfg["criteria"],
                max_tokens=cfg["max_tokens"],
                chunk_size=cfg["chunk_size"],
            )
            assert server.calls[0]["max_tokens"] == cfg["max_tokens"]
        assert rec.status == {"PF": "ok", "SC": "ok"}, path.name
