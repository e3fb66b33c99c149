"""The judge through the Batch API: same prompts, answers, cache and retry rules as online, resumable.

Every test talks HTTP to a fake files + batches server on 127.0.0.1 (experiments/benchmarks/fake_batch_api.py)
through the real openai client.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_judge import criterion_of, expected, index_of, make_items, oracle

from cag.remote.batch import BatchChatClient, BatchPendingError
from cag.remote.chat import ChatClient
from evaluation.judge import judge_items
from experiments.benchmarks.fake_batch_api import FakeBatchAPI
from experiments.benchmarks.fake_chat_api import FaultInjector, OpenAICompatServer, Reply

FAKE_KEY = "sk-batch-LEAKCANARY-5e0c1b"
FAST = dict(backoff_base_s=0.005, backoff_max_s=0.02)


@pytest.fixture(autouse=True)
def _fake_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)


def batch_client(server: FakeBatchAPI, cache: Path, **kw: Any) -> BatchChatClient:
    opts: dict[str, Any] = dict(FAST, max_retries=4, poll_interval_s=0.02, max_wait_s=30.0, cache_dir=cache)
    opts.update(kw)
    return BatchChatClient("gpt-judge", base_url=server.base_url, **opts)


def summary(records: list[Any]) -> list[tuple[Any, ...]]:
    return [(r.key, r.pf, r.sc, r.status, r.reasoning) for r in records]


def test_batch_and_online_send_the_same_bodies_and_give_identical_scores_one_line_per_criterion(
    tmp_path: Path,
) -> None:
    items = make_items(30)
    with OpenAICompatServer(oracle) as online_server:
        online_client = ChatClient(
            "gpt-judge", base_url=online_server.base_url, cache_dir=tmp_path / "c1", **FAST
        )
        online = judge_items(items, online_client, chunk_size=7)
        online_bodies = sorted(json.dumps(b, sort_keys=True) for b in online_server.calls)
    with FakeBatchAPI(oracle, batch_delay_s=0.05) as server:
        client = batch_client(server, tmp_path / "c2")
        batch = judge_items(items, client, chunk_size=7)
        batch_bodies = sorted(json.dumps(b, sort_keys=True) for b in server.calls)
        # chunks of 7 items still make one input file and one batch
        assert (server.uploads, server.batches_created, server.batch_lines) == (1, 1, 60)
    assert summary(batch) == summary(online)
    assert batch_bodies == online_bodies, "a batch line carries exactly the online request body"
    assert client.calls_made == online_client.calls_made == 60, (
        "one call per criterion per sample in both modes"
    )
    assert all(r.attempts == {"PF": 1, "SC": 1} and r.model_reported["PF"] == "judge-x" for r in batch)
    # both modes share the cache: the online client now finds every batch answer
    with OpenAICompatServer(oracle) as online_server:
        again = judge_items(
            items, ChatClient("gpt-judge", base_url=online_server.base_url, cache_dir=tmp_path / "c2")
        )
        assert online_server.calls == []
    assert summary(again) == summary(online)


def test_faulty_batches_are_retried_in_follow_up_batches_and_failures_are_recorded_never_scored(
    tmp_path: Path,
) -> None:
    def responder(body: dict[str, Any], i: int) -> Reply:
        if index_of(body) == 3:  # one sample the judge never answers properly
            return Reply.answer("I cannot score this.")
        return faults(body, i)

    faults = FaultInjector(oracle, p429=0.05, p500=0.05, p_malformed=0.1, seed=3)
    items = make_items(40)
    with FakeBatchAPI(
        responder,
        batch_delay_s=0.05,
        p_error_line=0.08,
        p_drop=0.05,
        p_malformed=0.08,
        p_poll_error=0.2,
        batch_statuses={0: "expired"},
        seed=5,
    ) as server:
        client = batch_client(server, tmp_path / "cache")
        records = judge_items(items, client)
        assert all(server.faults[k] > 0 for k in ("error_line", "drop", "malformed", "poll_error")), (
            server.faults
        )
        assert faults.injected["malformed"] > 0 and faults.injected["429"] + faults.injected["500"] > 0
        assert server.batches_created > 1, "failed lines went into follow-up batches"
        assert server.batch_lines == client.calls_made
    for i, rec in enumerate(records):
        if i == 3:
            assert rec.pf is None and rec.sc is None and rec.status == {"PF": "failed", "SC": "failed"}
            assert rec.attempts == {"PF": 5, "SC": 5}, "1 + max_retries attempts, as online"
            assert "gave up after 5 calls" in rec.error["PF"] and "invalid answer" in rec.error["PF"]
            assert rec.raw["PF"][0] == "I cannot score this."
        else:
            assert rec.status == {"PF": "ok", "SC": "ok"}, (i, rec.error)
            assert (rec.pf, rec.sc) == (expected(i, "PF"), expected(i, "SC"))
    per_criterion = client.calls_made / (len(items) * 2)
    assert 1.0 < per_criterion < 2.5  # half of the first batch expired unanswered, one sample never answers
    states = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "batches").glob("batch-*.json")]
    assert len(states) == server.batches_created and all(s["done"] for s in states)
    assert any(s["finished_status"] == "expired" for s in states) and any(
        s["finished_status"] == "completed" for s in states
    ), "the expired first batch's unanswered half went into follow-up batches"
    assert list((tmp_path / "cache" / "batches").glob("input-*.jsonl")) == [], "input files removed once done"
    assert FAKE_KEY not in "".join(p.read_text() for p in (tmp_path / "cache").rglob("*") if p.is_file())


def test_retry_mode_online_sends_only_the_invalid_answers_online(tmp_path: Path) -> None:
    def responder(body: dict[str, Any], i: int) -> Reply:
        # the 20 batch lines arrive first: every one of them gets an out-of-range score
        return Reply.answer('{"score": 12}') if i < 20 else oracle(body, i)

    items = make_items(10)
    with FakeBatchAPI(responder, batch_delay_s=0.05) as server:
        records = judge_items(items, batch_client(server, tmp_path / "cache", retry_mode="online"))
        assert server.batches_created == 1 and server.batch_lines == 20
        assert server.online_calls == 20, "20 lines in the batch, then 20 online calls"
    for i, rec in enumerate(records):
        assert (rec.pf, rec.sc) == (expected(i, "PF"), expected(i, "SC"))
        assert rec.attempts == {"PF": 2, "SC": 2} and rec.raw["SC"][0] == '{"score": 12}'


def test_interrupted_batch_resumes_by_its_id_without_sending_anything_again(tmp_path: Path) -> None:
    items = make_items(6)
    with FakeBatchAPI(oracle, batch_delay_s=1.0) as server:
        with pytest.raises(BatchPendingError, match="rerun the same command") as info:
            judge_items(items, batch_client(server, tmp_path / "cache", max_wait_s=0.2))
        (batch_id,) = info.value.batch_ids
        state = json.loads((tmp_path / "cache" / "batches" / f"batch-{batch_id}.json").read_text())
        assert state["batch_id"] == batch_id and len(state["custom_ids"]) == 12 and not state["done"]
        assert (tmp_path / "cache" / "batches" / state["spool"]).is_file(), "input kept while the batch runs"

        resumed_client = batch_client(server, tmp_path / "cache")
        records = judge_items(items, resumed_client)
        assert (server.uploads, server.batches_created) == (1, 1), "the rerun polled the stored batch id"
        assert resumed_client.batches_resumed == [batch_id] and resumed_client.calls_made == 0
    assert [(r.pf, r.sc) for r in records] == [(expected(i, "PF"), expected(i, "SC")) for i in range(6)]
    assert all(r.attempts == {"PF": 1, "SC": 1} for r in records)

    with FakeBatchAPI(oracle) as server:  # everything is cached now: not even a poll
        third = batch_client(server, tmp_path / "cache")
        judge_items(items, third)
        assert third.api_calls == 0 and server.polls == 0 and server.calls == []


def test_refusals_and_permanent_errors_in_a_batch_are_recorded_not_retried(tmp_path: Path) -> None:
    def responder(body: dict[str, Any], i: int) -> Reply:
        idx = index_of(body)
        if criterion_of(body) == "SC" and idx == 0:
            return Reply.answer("", finish_reason="content_filter")
        if criterion_of(body) == "SC" and idx == 1:
            return Reply.http_error(
                400, "blocked by the content management policy", code="content_policy_violation"
            )
        if criterion_of(body) == "SC" and idx == 2:
            return Reply.http_error(400, "max_tokens is too large", code="invalid_value")
        return oracle(body, i)

    with FakeBatchAPI(responder, batch_delay_s=0.02) as server:
        records = judge_items(make_items(3), batch_client(server, tmp_path / "cache"))
        assert server.batches_created == 1 and server.batch_lines == 6
    assert [r.status["SC"] for r in records] == ["refused", "refused", "failed"]
    assert all(r.sc is None and r.attempts["SC"] == 1 for r in records)
    assert "invalid_value" in records[2].error["SC"]
    assert [r.pf for r in records] == [expected(i, "PF") for i in range(3)]


def test_a_rejected_upload_fails_every_request_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeBatchAPI(oracle) as server:
        client = batch_client(server, tmp_path / "cache")
        monkeypatch.setattr(
            server, "_store_file", lambda name, data: (_ for _ in ()).throw(RuntimeError("boom"))
        )
        records = judge_items(make_items(2), client)
    assert all(r.status == {"PF": "failed", "SC": "failed"} and r.pf is None for r in records)
    assert all("not sent" in (r.error["PF"] or "") for r in records)
