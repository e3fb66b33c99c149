"""Benchmarks report their spread: interleaved rounds, median/IQR, and a bootstrap interval of the ratio."""

from __future__ import annotations

import itertools
import random
import runpy
import sys
from pathlib import Path

from experiments.benchmarks import spread

BENCH = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks"


def test_paired_ratios_cancel_drift_and_stop_at_the_minimum():
    rounds = itertools.count()
    state = {"r": 0}

    def base() -> float:
        state["r"] = next(rounds) // 2 + 1  # both calls of a round see the same load level
        return float(state["r"])

    def mode() -> float:
        state["r"] = next(rounds) // 2 + 1
        return 1.1 * state["r"]

    s = spread.interleave({"base": base, "mode": mode}, "base", min_rounds=10, max_rounds=40)
    assert s.rounds == 10 and s.target_met
    assert all(abs(r - 1.1) < 1e-12 for r in s.ratios["mode"])
    assert spread.quartiles(s.values["base"])[0] < spread.quartiles(s.values["base"])[2]  # the times did spread


def test_noise_keeps_measuring_up_to_the_maximum_and_says_so():
    rng = random.Random(0)
    s = spread.interleave({"base": lambda: 1.0, "mode": lambda: rng.uniform(0.5, 1.5)}, "base",
                          min_rounds=10, max_rounds=15)
    assert s.rounds == 15 and not s.target_met
    table = s.table(unit="s", ratio_name="/base")
    assert "15 interleaved rounds" in table and "still wider" in table and "CI " in table


def test_every_mode_takes_its_turn_first():
    calls = []

    def make(name):
        def run() -> float:
            calls.append(name)
            return 1.0
        return run

    spread.interleave({m: make(m) for m in ("a", "b", "c")}, "a", min_rounds=3, max_rounds=3)
    firsts = [calls[i * 3] for i in range(3)]
    assert sorted(firsts) == ["a", "b", "c"]


def test_bootstrap_interval_is_reproducible_and_contains_the_median():
    values = [1.0, 1.02, 0.98, 1.05, 1.01, 0.99, 1.03, 1.0, 0.97, 1.04]
    lo, hi = spread.bootstrap_median_ci(values)
    assert (lo, hi) == spread.bootstrap_median_ci(values)
    assert lo <= spread.quartiles(values)[1] <= hi


def test_attention_benchmark_runs_small_and_prints_spread_and_the_previous_path(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench_attention.py", "--tokens-side", "4", "--text", "200", "--dim", "32",
                                      "--heads", "2", "--layers", "1", "--min-rounds", "2", "--max-rounds", "2"])
    runpy.run_path(str(BENCH / "bench_attention.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "2 interleaved rounds" in out
    for mode in ("full", "masked", "recompute", "dense"):
        assert f"  {mode}" in out
    assert "masked/full 95% CI" in out
