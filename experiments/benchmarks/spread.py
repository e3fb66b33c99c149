"""Interleaved repeats with their spread: what every benchmark here reports.

Why: on a shared 2-core machine a median of three gave masked/full = 0.85, 1.07 and 1.07
in three runs in a row; a single number says nothing about how far the next run lands.
:func:`interleave` runs every mode once per round, in a rotating order (so no mode is
always first after a pause), for at least ``min_rounds`` rounds and then until the 95 %
bootstrap interval of every ratio to the baseline is within ``±ci_halfwidth`` of it,
relative (±0.02 around a ratio near 1), or ``max_rounds`` is reached (the report then says
the target was missed).

The ratio of a round is taken within the round (mode time / baseline time measured
seconds apart), so slow drifts of the machine's load cancel; its median over rounds is the
reported ratio, with the interquartile range and the bootstrap interval of that median.
Times are reported as median and IQR per mode. Bootstrap draws use a fixed seed, so the
same measurements always give the same interval.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3), linear interpolation between order statistics."""
    s = sorted(values)
    if len(s) == 1:
        return s[0], s[0], s[0]
    q1, q2, q3 = statistics.quantiles(s, n=4, method="inclusive")
    return q1, q2, q3


def iqr(values: list[float]) -> float:
    """Interquartile range with statistics.quantiles' default (exclusive) method, as the step benchmarks print it."""
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def bootstrap_median_ci(values: list[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the median (resampling rounds with replacement)."""
    rng = random.Random(seed)
    n = len(values)
    meds = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(n_boot))
    return meds[int(0.025 * n_boot)], meds[int(0.975 * n_boot) - 1]


@dataclass
class Spread:
    """Per-mode values and per-round ratios to the baseline after :func:`interleave`."""

    baseline: str
    values: dict[str, list[float]]
    ratios: dict[str, list[float]] = field(default_factory=dict)
    target_met: bool = False
    ci_halfwidth: float = 0.02

    @property
    def rounds(self) -> int:
        return len(self.values[self.baseline])

    def ratio_ci(self, mode: str) -> tuple[float, float]:
        return bootstrap_median_ci(self.ratios[mode])

    def table(self, unit: str = "s", ratio_name: str = "ratio") -> str:
        """One line per mode: median [q1, q3] of the values, and the ratio with its IQR and 95 % CI."""
        lines = [f"{self.rounds} interleaved rounds; median [IQR] per mode; {ratio_name} per round, "
                 f"median [IQR] (95 % bootstrap CI of the median)"]
        for mode, vals in self.values.items():
            q1, med, q3 = quartiles(vals)
            line = f"  {mode:<10} {med:10.4g} {unit} [{q1:.4g}, {q3:.4g}]"
            if mode != self.baseline:
                r1, rm, r3 = quartiles(self.ratios[mode])
                lo, hi = self.ratio_ci(mode)
                line += f"   {ratio_name} {rm:.3f} [{r1:.3f}, {r3:.3f}] (CI {lo:.3f}-{hi:.3f})"
            lines.append(line)
        if not self.target_met:
            lines.append(f"  note: a ratio's CI is still wider than ±{self.ci_halfwidth} after {self.rounds} rounds "
                         f"(the machine is noisy): read the IQR")
        return "\n".join(lines)


def interleave(
    modes: Mapping[str, Callable[[], float]],
    baseline: str,
    min_rounds: int = 10,
    max_rounds: int = 40,
    ci_halfwidth: float = 0.02,
    ratio: Callable[[float, float], float] = lambda value, base: value / base,
    progress: Callable[[str], None] | None = None,
) -> Spread:
    """Run each mode's measurement once per round until the ratios are pinned down.

    ``modes[name]()`` returns one measurement (a time, or a throughput); ``ratio(value,
    base)`` turns a round's measurement into its ratio to the baseline (time ratio by
    default; pass ``lambda v, b: v / b`` on throughputs too, or its inverse, as the
    benchmark's claim reads).
    """
    if baseline not in modes:
        raise ValueError(f"baseline {baseline!r} is not one of {list(modes)}")
    names = list(modes)
    spread = Spread(baseline, {m: [] for m in names}, {m: [] for m in names if m != baseline},
                    ci_halfwidth=ci_halfwidth)
    for r in range(max_rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        got = {m: modes[m]() for m in order}
        for m in names:
            spread.values[m].append(got[m])
            if m != baseline:
                spread.ratios[m].append(ratio(got[m], got[baseline]))
        if progress is not None:
            progress(f"round {r + 1}: " + ", ".join(f"{m} {got[m]:.4g}" for m in names))
        if r + 1 >= min_rounds:
            # relative half-width: ±0.02 around a ratio near 1, ±2 % of a 20x throughput ratio
            widths = [(hi - lo) / 2 / abs(statistics.median(spread.ratios[m]))
                      for m, (lo, hi) in ((m, spread.ratio_ci(m)) for m in spread.ratios)]
            if all(w <= ci_halfwidth for w in widths):
                spread.target_met = True
                break
    return spread
