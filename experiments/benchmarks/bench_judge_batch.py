"""Online judge vs Batch API judge on the same answers: calls per criterion per sample, identical scores.

The batch mode is only worth its half price if it measures the same thing. This runs the
300-sample x PF/SC judgement twice against local servers that give every request the same
answer in both modes (a deterministic judge whose score depends on sample and criterion),
online through ``/v1/chat/completions`` and in batch mode through ``/v1/files`` +
``/v1/batches``, and prints calls per criterion per sample, batches, wall time, and whether
every per-sample score is identical. ``--faults`` adds the failures each path sees in
practice: online 5 % 429, 5 % 500 and 10 % invalid answers; in batch mode the same invalid
answers plus 5 % error-file lines, 2 % dropped lines and 3 % malformed output lines, all
retried within the same budget (``1 + max_retries`` calls per request).

    python experiments/benchmarks/bench_judge_batch.py
    python experiments/benchmarks/bench_judge_batch.py --faults
    python experiments/benchmarks/bench_judge_batch.py --faults --retry-mode online

The fake files/batches server is test support code (``experiments/benchmarks/fake_batch_api.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

from cag.remote.batch import BatchChatClient
from cag.remote.chat import ChatClient
from evaluation.judge import JudgeItem, judge_items
from experiments.benchmarks.fake_batch_api import FakeBatchAPI
from experiments.benchmarks.fake_chat_api import FaultInjector, OpenAICompatServer, Reply


def deterministic_judge(body: dict[str, Any], call_index: int) -> Reply:
    """The same answer for the same request in either mode: the score encodes sample and criterion."""
    text = body["messages"][1]["content"][0]["text"]
    idx = int(text.split("sample ")[1].split(":")[0])
    pf = "PROMPT FOLLOWING" in body["messages"][0]["content"]
    score = idx % 11 if pf else (3 * idx + 4) % 11
    return Reply.answer(json.dumps({"score": score, "reasoning": f"sample {idx}"}))


def make_items(n: int, size: int) -> list[JudgeItem]:
    refs = [Image.new("RGB", (size, size), c) for c in ((200, 40, 40), (40, 200, 40), (40, 40, 200))]
    return [
        JudgeItem(
            key=f"bench{i:05d}",
            instruction=f"sample {i}: Fig. 1 and Fig. 2 in front of Fig. 3",
            references=refs,
            generated=Image.new("RGB", (size, size), (i % 256, 90, 160)),
            task_type="bench",
        )
        for i in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--faults", action="store_true")
    parser.add_argument("--retry-mode", choices=("batch", "online"), default="batch")
    parser.add_argument("--max-retries", type=int, default=6)
    args = parser.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "sk-local-benchmark")
    items = make_items(args.n, args.size)
    fast = dict(backoff_base_s=0.01, backoff_max_s=0.05, max_retries=args.max_retries, max_concurrency=16)

    responder = deterministic_judge
    if args.faults:
        online_faults = FaultInjector(deterministic_judge, p429=0.05, p500=0.05, p_malformed=0.10, seed=1)
        batch_faults = FaultInjector(deterministic_judge, p_malformed=0.10, seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        with OpenAICompatServer(online_faults if args.faults else responder) as server:
            client = ChatClient(
                "bench-judge", base_url=server.base_url, cache_dir=Path(tmp) / "online", **fast
            )
            t0 = time.perf_counter()
            online = judge_items(items, client)
            t_online = time.perf_counter() - t0
        line_faults = dict(p_error_line=0.05, p_drop=0.02, p_malformed=0.03) if args.faults else {}
        with FakeBatchAPI(
            batch_faults if args.faults else responder, batch_delay_s=0.5, seed=3, **line_faults
        ) as bs:
            bclient = BatchChatClient(
                "bench-judge",
                base_url=bs.base_url,
                cache_dir=Path(tmp) / "batch",
                poll_interval_s=0.1,
                retry_mode=args.retry_mode,
                **fast,
            )
            t0 = time.perf_counter()
            batch = judge_items(items, bclient)
            t_batch = time.perf_counter() - t0
            n_batches, lines, online_retry_calls = (
                bs.batches_created,
                bs.batch_lines,
                bs.online_calls,
            )

    judgements = 2 * len(items)
    same = [(r.pf, r.sc, r.status) for r in online] == [(r.pf, r.sc, r.status) for r in batch]
    ok_online = sum(r.status == {"PF": "ok", "SC": "ok"} for r in online)
    ok_batch = sum(r.status == {"PF": "ok", "SC": "ok"} for r in batch)
    print(f"{len(items)} samples x PF/SC = {judgements} judgements, faults={'on' if args.faults else 'off'}")
    print(
        f"online: {client.calls_made} calls = {client.calls_made / judgements:.3f} per criterion per sample, "
        f"{t_online:.2f} s, fully scored samples {ok_online}/{len(items)}"
    )
    print(
        f"batch ({args.retry_mode} retries): {bclient.calls_made} billed calls = "
        f"{bclient.calls_made / judgements:.3f} per criterion per sample ({lines} batch lines in {n_batches} "
        f"batches + {online_retry_calls} online), {bclient.api_calls} files/batches API calls, {t_batch:.2f} s, "
        f"fully scored samples {ok_batch}/{len(items)}"
    )
    print(f"identical per-sample scores and statuses online vs batch: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
