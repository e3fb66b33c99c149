"""Confidence intervals for the ablation tables: a two-way bootstrap over training seeds and test samples.

Why this design: an ablation score has two independent sources of noise, the training run
(seed: initialisation, data order, dropout draws) and the finite test set. The test
samples are *crossed* with the seeds (every seed's model is scored on the same 300
samples, image *i* always drawn with sampling noise ``eval seed + i``), so one bootstrap
replicate draws ``S`` seeds with replacement **and** ``N`` test samples with replacement
and applies the same sample draw to every drawn seed. Resampling only the samples would
ignore seed-to-seed variation (with one seed it is all we can do, and the tables say so);
resampling seeds only would ignore the test set's size.

The statistic of one replicate is what the evaluation reports (:func:`evaluation.report.summarise`):
the mean over samples per task type, then the unweighted mean over task types, then the
mean over seeds. With one seed and the full sample, the point estimate equals the
``eval/...`` metric the evaluation wrote to MLflow.

Paired differences (configuration A minus B) are taken per training seed and per test
sample *before* the bootstrap: the same test item, the same sampling noise and (for the
embedded model) the same initialisation and data order, so most of the noise cancels and
the interval is much narrower than the two per-configuration intervals suggest.

Intervals are percentile intervals of ``n_boot`` replicates from a generator with a fixed
seed, so the same scores always give the same interval. Missing scores (a failed judge
call) are NaN and left out of their group's mean, as the evaluation does.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

N_BOOT = 2000
LEVEL = 0.95
BOOT_SEED = 20240611
METHOD = (
    "two-way percentile bootstrap: each replicate resamples training seeds and test samples with replacement "
    "(the same sample draw for every seed); statistic = mean over task types of the per-type sample mean, "
    "averaged over seeds"
)


@dataclass(frozen=True)
class Estimate:
    """A mean with its bootstrap interval and what it rests on."""

    mean: float
    lo: float
    hi: float
    n_seeds: int
    n_samples: int
    p_positive: float | None = None  # fraction of replicates above 0 (differences only)

    def to_json(self) -> dict[str, float | int | None]:
        return asdict(self)

    @property
    def excludes_zero(self) -> bool:
        return bool(np.isfinite(self.lo) and np.isfinite(self.hi) and (self.lo > 0 or self.hi < 0))


def score_matrix(
    per_seed: Sequence[Mapping[str, float | None]], keys: Sequence[str]
) -> np.ndarray:
    """``[seeds, samples]`` array of one metric, NaN where a seed has no (valid) score for a key."""
    out = np.full((len(per_seed), len(keys)), np.nan, dtype=float)
    for s, scores in enumerate(per_seed):
        for i, k in enumerate(keys):
            v = scores.get(k)
            if v is not None and np.isfinite(v):
                out[s, i] = float(v)
    return out


def _group_codes(groups: Sequence[str] | None, n: int) -> np.ndarray:
    if groups is None:
        return np.zeros(n, dtype=int)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} task types for {n} samples")
    names = {g: i for i, g in enumerate(sorted(set(groups)))}
    return np.array([names[g] for g in groups], dtype=int)


def _statistic(values: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Balanced mean of ``values[..., seeds, samples]`` with task-type ``codes[..., samples]`` -> ``[...]``.

    Per seed: mean per task type over finite values, then the unweighted mean over the
    types that have any; then the mean over the seeds that have any.
    """
    finite = np.isfinite(values)
    vals = np.where(finite, values, 0.0)
    type_means = []
    for g in np.unique(codes):
        in_g = (codes == g)[..., None, :]  # broadcast over seeds
        cnt = (finite & in_g).sum(axis=-1)
        tot = (vals * in_g).sum(axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            type_means.append(np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan))
    stacked = np.stack(type_means, axis=-1)  # [..., seeds, types]
    with warnings.catch_warnings():  # "mean of empty slice": an all-NaN replicate is NaN, and reported as such
        warnings.simplefilter("ignore", RuntimeWarning)
        per_seed = np.nanmean(stacked, axis=-1)
        return np.nanmean(per_seed, axis=-1)


def bootstrap(
    values: np.ndarray,
    groups: Sequence[str] | None = None,
    *,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = BOOT_SEED,
    difference: bool = False,
) -> Estimate:
    """Point estimate and two-way bootstrap interval of a ``[seeds, samples]`` score array (see module doc).

    ``difference=True`` also reports the fraction of replicates above zero (how often the
    sign would hold on another draw of seeds and samples).
    """
    values = np.asarray(values, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"expected [seeds, samples], got shape {values.shape}")
    n_seeds, n_samples = values.shape
    codes = _group_codes(groups, n_samples)
    if n_seeds == 0 or n_samples == 0 or not np.isfinite(values).any():
        nan = float("nan")
        return Estimate(nan, nan, nan, n_seeds, n_samples, None)
    point = float(_statistic(values, codes))
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot, dtype=float)
    chunk = max(1, int(4_000_000 // max(1, n_seeds * n_samples)))  # bound memory: ~32 MB per chunk
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        si = rng.integers(0, n_seeds, size=(b, n_seeds))
        ii = rng.integers(0, n_samples, size=(b, n_samples))
        drawn = values[si[:, :, None], ii[:, None, :]]  # [b, seeds, samples]
        reps[start : start + b] = _statistic(drawn, codes[ii])
    alpha = (1.0 - level) / 2.0
    ok = reps[np.isfinite(reps)]
    lo, hi = (np.quantile(ok, [alpha, 1.0 - alpha]) if ok.size else (np.nan, np.nan))
    p_pos = float((ok > 0).mean()) if (difference and ok.size) else None
    return Estimate(point, float(lo), float(hi), n_seeds, n_samples, p_pos)


def align(
    a: Mapping[int, Mapping[str, float | None]],
    b: Mapping[int, Mapping[str, float | None]],
) -> tuple[list[int], list[str]]:
    """Training seeds and sample keys both configurations have: the pairs of a paired comparison."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return [], []
    keys = set.intersection(*(set(a[s]) & set(b[s]) for s in seeds))
    order = list(a[seeds[0]])  # keep the benchmark's order (stable bootstrap draws)
    return seeds, [k for k in order if k in keys]


def paired_difference(
    a: Mapping[int, Mapping[str, float | None]],
    b: Mapping[int, Mapping[str, float | None]],
    task_types: Mapping[str, str] | None = None,
    **kw: object,
) -> Estimate:
    """A minus B on the same training seeds and the same test samples (``seed -> key -> score``), with its CI."""
    seeds, keys = align(a, b)
    va = score_matrix([a[s] for s in seeds], keys)
    vb = score_matrix([b[s] for s in seeds], keys)
    groups = [task_types.get(k, "default") for k in keys] if task_types else None
    return bootstrap(va - vb, groups, difference=True, **kw)  # type: ignore[arg-type]


def config_estimate(
    per_seed: Mapping[int, Mapping[str, float | None]],
    task_types: Mapping[str, str] | None = None,
    **kw: object,
) -> Estimate:
    """Mean and CI of one configuration (``seed -> key -> score``) over its seeds and the samples all seeds have."""
    seeds = sorted(per_seed)
    if not seeds:
        return bootstrap(np.empty((0, 0)))
    keys_common = set.intersection(*(set(per_seed[s]) for s in seeds))
    keys = [k for k in per_seed[seeds[0]] if k in keys_common]
    groups = [task_types.get(k, "default") for k in keys] if task_types else None
    return bootstrap(score_matrix([per_seed[s] for s in seeds], keys), groups, **kw)  # type: ignore[arg-type]


def argmax_frequency(
    configs: Mapping[str, Mapping[int, Mapping[str, float | None]]],
    task_types: Mapping[str, str] | None = None,
    *,
    n_boot: int = N_BOOT,
    seed: int = BOOT_SEED,
) -> dict[str, float]:
    """How often each configuration has the highest mean across bootstrap replicates (Fig. 10's peak).

    All configurations share one draw of seeds and samples per replicate, so the
    comparison is paired like :func:`paired_difference`.
    """
    names = list(configs)
    if not names:
        return {}
    seeds = sorted(set.intersection(*(set(configs[n]) for n in names)))
    if not seeds:
        return {n: float("nan") for n in names}
    keys_common = set.intersection(*(set(configs[n][s]) for n in names for s in seeds))
    keys = [k for k in configs[names[0]][seeds[0]] if k in keys_common]
    if not keys:
        return {n: float("nan") for n in names}
    codes = _group_codes([task_types.get(k, "default") for k in keys] if task_types else None, len(keys))
    arrays = [score_matrix([configs[n][s] for s in seeds], keys) for n in names]
    rng = np.random.default_rng(seed)
    wins = np.zeros(len(names))
    si = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
    ii = rng.integers(0, len(keys), size=(n_boot, len(keys)))
    stats = np.stack([_statistic(v[si[:, :, None], ii[:, None, :]], codes[ii]) for v in arrays], axis=-1)
    valid = np.isfinite(stats).all(axis=-1)
    for row in stats[valid]:
        wins[int(np.argmax(row))] += 1
    total = max(1, int(valid.sum()))
    return {n: float(w / total) for n, w in zip(names, wins, strict=True)}
