"""experiments/binding_curve.py: one row per run and step, seeds pooled, and a readable error for a bad point."""

from __future__ import annotations

import csv

import pytest

from experiments.binding_curve import main, parse_point
from tests.experiments.test_proxy_breakdown import _results

ALL = {"test-000000", "test-000001", "test-000002", "test-000003"}


def test_rows_follow_steps_and_pool_seeds(tmp_path):
    early = _results(tmp_path / "early", {"test-000000"}, 0.0)
    late_a = _results(tmp_path / "late_a", ALL, 0.3)
    late_b = _results(tmp_path / "late_b", set(), 0.3)
    out = tmp_path / "out"
    # points given out of order: the curve sorts them by step
    paths = main(["--run", "recipe", f"4500={late_a},{late_b}", f"1500={early}", "--out", str(out)])
    assert [p.name for p in paths] == ["binding_curve.csv", "binding_curve.png"]
    rows = list(csv.DictReader((out / "binding_curve.csv").open()))
    assert [(r["run"], r["step"], r["seeds"]) for r in rows] == [("recipe", "1500", "1"), ("recipe", "4500", "2")]
    assert float(rows[0]["bound"]) == pytest.approx(0.25) and float(rows[0]["swapped"]) == pytest.approx(0.75)
    assert float(rows[1]["bound"]) == pytest.approx(0.5)  # one seed binds all, the other none
    assert float(rows[1]["bound_lo"]) < 0.5 < float(rows[1]["bound_hi"])  # the seeds disagree: a wide interval
    assert float(rows[1]["pf_subjects"]) == pytest.approx(5.0)
    assert (out / "binding_curve.png").stat().st_size > 1000


def test_a_malformed_point_is_refused_by_its_text(tmp_path):
    assert parse_point("300=a,b")[0] == 300
    with pytest.raises(ValueError, match="'late=x'"):
        parse_point("late=x")
    with pytest.raises(SystemExit):
        main(["--run", "recipe", "1500", "--out", str(tmp_path)])
