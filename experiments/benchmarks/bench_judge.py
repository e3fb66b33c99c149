"""Throughput of the PF/SC judge against a local OpenAI-compatible server with API-like latency.

Judging the 300-sample test set is 600 calls; at ~200 ms+ per call that is two minutes
one call at a time. This prints how much the bounded concurrency buys, how many HTTP
calls each judgement costs (optionally under injected 429/500/garbage answers), and that a
rerun served from the cache costs nothing.

    python experiments/benchmarks/bench_judge.py                 # 300 samples x PF/SC, 16 in flight
    python experiments/benchmarks/bench_judge.py --faults        # same with 10 % 429, 10 % 500, 10 % garbage

The concurrency-1 baseline and the main run are repeated in interleaved rounds (each main
run with a fresh cache), and calls/s of each and their per-round ratio are reported as
median and IQR with the 95 % bootstrap interval of the ratio (experiments/benchmarks/spread.py).
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

from cag.remote.chat import ChatClient
from evaluation.aggregate import summarize
from evaluation.judge import JudgeItem, judge_items
from experiments.benchmarks.fake_chat_api import FaultInjector, OpenAICompatServer, Reply
from experiments.benchmarks.spread import interleave, quartiles


def constant_judge(body: dict[str, Any], call_index: int) -> Reply:
    return Reply.answer('{"score": 7, "reasoning": "benchmark answer"}')


def make_items(n: int, size: int, offset: int = 0) -> list[JudgeItem]:
    refs = [Image.new("RGB", (size, size), c) for c in ((200, 40, 40), (40, 200, 40), (40, 40, 200))]
    return [
        JudgeItem(
            key=f"bench{offset + i:05d}",
            instruction=f"benchmark sample {offset + i}: Fig. 1 and Fig. 2 in front of Fig. 3",
            references=refs,
            generated=Image.new("RGB", (size, size), ((offset + i) % 256, 90, 160)),
            task_type="bench",
        )
        for i in range(n)
    ]


def timed_run(
    server: OpenAICompatServer,
    items: list[JudgeItem],
    concurrency: int,
    cache_dir: Path | None,
    max_retries: int,
) -> dict[str, float]:
    client = ChatClient(
        "bench-judge",
        base_url=server.base_url,
        max_concurrency=concurrency,
        max_retries=max_retries,
        backoff_base_s=0.05,
        backoff_max_s=1.0,
        cache_dir=cache_dir,
    )
    server.reset_calls()
    start = time.perf_counter()
    records = judge_items(items, client, chunk_size=max(64, len(items)))
    wall = time.perf_counter() - start
    s = summarize(records)
    calls = len(server.calls)
    judgements = 2 * len(items)
    return {
        "samples": len(items),
        "judgements": judgements,
        "http_calls": calls,
        "wall_s": wall,
        "calls_per_s": calls / wall if wall > 0 else float("inf"),
        "judgements_per_s": judgements / wall if wall > 0 else float("inf"),
        "calls_per_criterion_per_sample": calls / judgements,
        "coverage_pf": s["coverage"]["PF"],
        "coverage_sc": s["coverage"]["SC"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=300, help="samples in the main run (x2 criteria)")
    ap.add_argument("--baseline-items", type=int, default=10, help="samples in the concurrency-1 baseline")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--latency", type=float, default=0.2, help="server latency per call, seconds")
    ap.add_argument("--image-size", type=int, default=256, help="side of the synthetic images, pixels")
    ap.add_argument(
        "--faults", action="store_true", help="inject 10%% 429, 10%% 500 and 10%% garbage answers"
    )
    ap.add_argument("--max-retries", type=int, default=8)
    ap.add_argument(
        "--max-wall",
        type=float,
        default=None,
        help="exit 1 if the main run takes longer (default 15 s without --faults, no limit with)",
    )
    ap.add_argument("--json", action="store_true", help="also print the numbers as one JSON line")
    ap.add_argument("--min-rounds", type=int, default=10)
    ap.add_argument("--max-rounds", type=int, default=20)
    ap.add_argument("--ci", type=float, default=0.02, help="stop when the ratio's 95%% CI is within +-this (relative)")
    args = ap.parse_args(argv)
    max_wall = args.max_wall if args.max_wall is not None else (float("inf") if args.faults else 15.0)

    os.environ.pop("OPENAI_API_KEY", None)  # local server: the client sends a placeholder
    p = 0.1 if args.faults else 0.0
    responder = FaultInjector(
        constant_judge,
        p429=p,
        p500=p,
        p_malformed=p,
        latency_s=args.latency,
        retry_after_s=0.1 if args.faults else None,
        seed=0,
    )
    runs: dict[str, list[dict[str, float]]] = {"baseline": [], "main": []}
    with OpenAICompatServer(responder) as server, tempfile.TemporaryDirectory() as tmp:
        base_items = make_items(args.baseline_items, args.image_size, offset=10**6)
        items = make_items(args.items, args.image_size)

        def baseline() -> float:
            runs["baseline"].append(timed_run(server, base_items, 1, None, args.max_retries))
            return runs["baseline"][-1]["calls_per_s"]

        def main_once() -> float:
            cache = Path(tempfile.mkdtemp(dir=tmp))  # fresh cache: every round makes every call
            runs["main"].append(timed_run(server, items, args.concurrency, cache, args.max_retries))
            runs["main"][-1]["cache"] = str(cache)  # type: ignore[assignment]
            return runs["main"][-1]["calls_per_s"]

        spread = interleave({"baseline": baseline, "main": main_once}, "baseline", min_rounds=args.min_rounds,
                            max_rounds=args.max_rounds, ci_halfwidth=args.ci)
        rerun = timed_run(server, items, args.concurrency, Path(str(runs["main"][-1]["cache"])), args.max_retries)

    # the round whose main run is the median one stands for the rest in the per-run lines below
    order = sorted(range(len(runs["main"])), key=lambda i: runs["main"][i]["wall_s"])
    mid = order[len(order) // 2]
    base, main_run = runs["baseline"][mid], runs["main"][mid]
    main_run.pop("cache", None)
    q1, med_wall, q3 = quartiles([r["wall_s"] for r in runs["main"]])
    speedup = quartiles(spread.ratios["main"])[1]
    serial_estimate = main_run["http_calls"] / base["calls_per_s"]
    print(
        f"server latency {args.latency * 1000:.0f} ms/call, images {args.image_size}px, "
        f"faults {'on (10% 429, 10% 500, 10% garbage)' if args.faults else 'off'}"
    )
    for name, r, conc in (
        ("baseline", base, 1),
        ("main", main_run, args.concurrency),
        ("cached rerun", rerun, args.concurrency),
    ):
        print(
            f"{name:<13} concurrency {conc:>2}: {r['samples']:>4} samples, {r['judgements']:>4} judgements, "
            f"{r['http_calls']:>4} HTTP calls in {r['wall_s']:6.2f} s = {r['calls_per_s']:6.1f} calls/s, "
            f"{r['calls_per_criterion_per_sample']:.3f} calls per criterion per sample, "
            f"coverage PF {r['coverage_pf']:.0%} SC {r['coverage_sc']:.0%}"
        )
    print(spread.table(unit="calls/s", ratio_name=f"speed-up c{args.concurrency}/c1"))
    print(
        f"speed-up (calls/s, concurrency {args.concurrency} vs 1): {speedup:.1f}x median over {spread.rounds} rounds; "
        f"the main run one at a time would take ~{serial_estimate:.0f} s"
    )
    ok = med_wall <= max_wall and rerun["http_calls"] == 0
    print(
        f"main run median {med_wall:.2f} s [IQR {q1:.2f}, {q3:.2f}] <= {max_wall:g} s: "
        f"{'yes' if med_wall <= max_wall else 'NO'}; cached rerun HTTP calls: {rerun['http_calls']}"
    )
    if args.json:
        print(json.dumps({"baseline": base, "main": main_run, "rerun": rerun, "speedup": speedup,
                          "speedup_rounds": spread.ratios["main"], "main_wall_s": [r["wall_s"] for r in runs["main"]]}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
