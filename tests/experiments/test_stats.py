"""The ablation statistics (experiments/stats.py): point estimates, bootstrap intervals, paired differences."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.report import SampleResult, summarise
from experiments import stats


def _scores(values: np.ndarray, keys: list[str]) -> dict[int, dict[str, float | None]]:
    return {s: {k: float(values[s, i]) for i, k in enumerate(keys)} for s in range(values.shape[0])}


def test_point_estimate_with_one_seed_equals_the_evaluations_headline():
    """One seed, all samples: the table's mean is the number evaluation/runner.py wrote to MLflow (per-task-type mean)."""
    rng = np.random.default_rng(1)
    keys = [f"k{i}" for i in range(30)]
    types = {k: ("single" if i < 7 else "multi") for i, k in enumerate(keys)}
    vals = rng.uniform(0, 10, size=(1, 30))
    vals[0, 3] = np.nan  # a failed judge call is left out, not counted as 0
    est = stats.config_estimate(_scores(vals, keys), types, n_boot=200)
    results = [SampleResult(k, "", {"pf": None if np.isnan(vals[0, i]) else vals[0, i]}, types[k])
               for i, k in enumerate(keys)]
    assert est.mean == pytest.approx(summarise("x", results).metrics["pf"], abs=1e-12)
    assert est.mean != pytest.approx(float(np.nanmean(vals)), abs=1e-6)  # the weighting really differs here


def test_bootstrap_interval_is_reproducible_contains_the_mean_and_shrinks_with_more_samples():
    rng = np.random.default_rng(2)
    small = rng.normal(5, 2, size=(2, 40))
    large = rng.normal(5, 2, size=(2, 400))
    a, b = stats.bootstrap(small), stats.bootstrap(small)
    assert a == b  # fixed bootstrap seed: the same scores always give the same table
    assert a.lo < a.mean < a.hi
    c = stats.bootstrap(large)
    assert (c.hi - c.lo) < 0.6 * (a.hi - a.lo)


def test_seed_to_seed_variation_widens_the_interval():
    """Resampling seeds is what makes the interval honest about training noise: offset seeds widen it."""
    rng = np.random.default_rng(3)
    base = rng.normal(5, 1, size=(1, 200))
    same = np.repeat(base, 3, axis=0)
    offset = same + np.array([[-1.0], [0.0], [1.0]])
    tight, wide = stats.bootstrap(same), stats.bootstrap(offset)
    assert tight.mean == pytest.approx(wide.mean)
    assert (wide.hi - wide.lo) > 3 * (tight.hi - tight.lo)


def test_paired_difference_cancels_shared_noise_and_pairs_by_key_not_position():
    rng = np.random.default_rng(4)
    keys = [f"k{i}" for i in range(100)]
    noise = rng.normal(5, 2, size=(2, 100))
    a = _scores(noise + 0.2, keys)
    b = _scores(noise, keys)
    b_shuffled = {s: dict(reversed(list(v.items()))) for s, v in b.items()}
    d = stats.paired_difference(a, b_shuffled)
    assert d.mean == pytest.approx(0.2) and d.excludes_zero and d.p_positive == 1.0
    # unpaired, the two configurations' intervals overlap: only the pairing shows the difference
    ea, eb = stats.config_estimate(a), stats.config_estimate(b)
    assert ea.lo < eb.hi
    # a key or a seed only one side has is not a pair
    a[5] = dict(a[0])
    del b[1]["k7"]
    d2 = stats.paired_difference(a, b)
    assert (d2.n_seeds, d2.n_samples) == (2, 99)


def test_argmax_frequency_finds_a_clear_peak():
    rng = np.random.default_rng(5)
    keys = [f"k{i}" for i in range(50)]
    noise = rng.normal(5, 1, size=(2, 50))
    configs = {"0.0": _scores(noise, keys), "0.5": _scores(noise + 1.0, keys), "0.7": _scores(noise - 0.5, keys)}
    freq = stats.argmax_frequency(configs, n_boot=300)
    assert freq["0.5"] == 1.0 and sum(freq.values()) == pytest.approx(1.0)


def test_all_missing_scores_give_nan_not_zero():
    est = stats.bootstrap(np.full((2, 5), np.nan))
    assert np.isnan(est.mean) and np.isnan(est.lo)
