"""PF / SC / Overall aggregation rules (docs/design.md, 'Judge metrics')."""

from __future__ import annotations

import math

import pytest

from evaluation.aggregate import overall_per_sample, summarize
from evaluation.judge import JudgeRecord


def rec(
    key: str, pf: float | None, sc: float | None, task: str = "default", pf_st: str = "ok", sc_st: str = "ok"
) -> JudgeRecord:
    return JudgeRecord(
        key=key,
        task_type=task,
        pf=pf if pf_st == "ok" else None,
        sc=sc if sc_st == "ok" else None,
        status={"PF": pf_st, "SC": sc_st},
    )


def test_overall_per_sample_is_the_geometric_mean() -> None:
    assert overall_per_sample(4.0, 9.0) == 6.0
    assert overall_per_sample(0.0, 9.0) == 0.0
    with pytest.raises(ValueError):
        overall_per_sample(-1.0, 4.0)


def test_overall_is_mean_of_per_sample_geometric_means_not_of_the_means() -> None:
    s = summarize([rec("a", 4, 9), rec("b", 9, 4)])
    assert s["PF"] == 6.5 and s["SC"] == 6.5
    assert s["Overall"] == pytest.approx(6.0)  # mean(sqrt(36), sqrt(36))
    assert math.sqrt(s["PF"] * s["SC"]) == pytest.approx(6.5)  # what a wrong implementation would give


def test_summarize_reproduces_paper_table_1_where_overall_of_the_means_cannot() -> None:
    # Two samples whose means are Table 1's PF 7.308 and SC 7.906; the paper reports Overall 7.568,
    # which only the per-sample order reaches (sqrt of the means would be 7.601 for any such set).
    s = summarize([rec("a", 7.989, 7.169), rec("b", 6.627, 8.643)])
    assert s["PF"] == pytest.approx(7.308) and s["SC"] == pytest.approx(7.906)
    assert s["Overall"] == pytest.approx(7.568, abs=5e-4)
    assert math.sqrt(s["PF"] * s["SC"]) - s["Overall"] > 0.03


def test_headline_is_unweighted_mean_over_task_types() -> None:
    records = [rec(f"a{i}", 8, 8, "single") for i in range(9)] + [rec("b0", 2, 2, "multi")]
    s = summarize(records)
    assert s["by_task_type"]["single"]["Overall"] == pytest.approx(8.0)
    assert s["by_task_type"]["multi"]["Overall"] == pytest.approx(2.0)
    assert s["Overall"] == pytest.approx(5.0)  # (8 + 2) / 2, each task type weighs the same
    assert s["pooled"]["Overall"] == pytest.approx((9 * 8 + 2) / 10)  # sample-weighted, reported apart
    assert s["PF"] == pytest.approx(5.0) and s["n_task_types"] == 2


def test_failed_criterion_is_left_out_of_overall_and_counted() -> None:
    records = [rec("a", 9, 1), rec("b", 4, None, sc_st="failed"), rec("c", None, 7, pf_st="refused")]
    s = summarize(records)
    assert s["PF"] == pytest.approx(6.5)  # a and b
    assert s["SC"] == pytest.approx(4.0)  # a and c
    assert s["Overall"] == pytest.approx(3.0)  # only a has both
    assert s["excluded_from_overall"] == 2
    assert s["failed"] == {"PF": 0, "SC": 1} and s["refused"] == {"PF": 1, "SC": 0}
    assert s["coverage"] == pytest.approx({"PF": 2 / 3, "SC": 2 / 3, "Overall": 1 / 3})


def test_a_score_on_a_non_ok_status_is_not_trusted() -> None:
    bogus = rec("x", 5, 5)
    bogus.status["SC"] = "failed"
    s = summarize([bogus, rec("y", 7, 7)])
    assert s["SC"] == 7.0 and s["failed"]["SC"] == 1 and s["Overall"] == 7.0


def test_task_type_without_scores_is_listed_not_zeroed() -> None:
    records = [rec("a", 6, 6, "t1"), rec("b", None, None, "t2", pf_st="failed", sc_st="failed")]
    s = summarize(records)
    assert s["Overall"] == 6.0
    assert s["task_types_without_scores"] == {"PF": ["t2"], "SC": ["t2"], "Overall": ["t2"]}


def test_summarize_accepts_dict_records() -> None:
    s = summarize([rec("a", 4, 9).to_dict(), rec("b", 9, 4, "other").to_dict()])
    assert s["Overall"] == pytest.approx(6.0)
    assert set(s["by_task_type"]) == {"default", "other"}
