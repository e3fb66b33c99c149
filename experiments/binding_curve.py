"""Binding against training steps: one line per run, from evaluations already made.

    python experiments/binding_curve.py --run "LABEL" STEP=EVAL_DIR[,EVAL_DIR ...] [STEP=EVAL_DIR ...] \
        [--run ...] --out DIR

Each ``STEP=EVAL_DIR`` is one point of a run: the ``results.jsonl`` of ``python evaluation/run.py`` on a
checkpoint saved at that step (a comma-joined list is one step's training seeds, bootstrapped over seeds
and samples as ``experiments/proxy_breakdown.py`` does). Writes ``binding_curve.csv`` (bound, swapped and
missing rates with their 95 % intervals, subjects PF, Overall) and ``binding_curve.png`` (bound and
swapped against steps, the issue's level-3 targets drawn in). Why it exists: whether level 3 is within
reach of more steps is a question about the shape of these curves, not about one endpoint.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path

from experiments.proxy_breakdown import read_config
from experiments.stats import bootstrap

COLUMNS = ("bound", "swapped", "missing", "pf_subjects", "proxy_overall")
TARGETS = {"bound": 0.8, "swapped": 0.1}  # issue "Where the tiny model stops learning", level 3


def parse_point(text: str) -> tuple[int, list[Path]]:
    """``"4500=a/eval,b/eval"`` -> ``(4500, [a/eval, b/eval])``; a malformed point is refused by its text."""
    step, sep, dirs = text.partition("=")
    if not sep or not step.strip().isdigit() or not dirs.strip():
        raise ValueError(f"point {text!r}: expected STEP=EVAL_DIR[,EVAL_DIR ...] with an integer step")
    return int(step), [Path(d) for d in dirs.split(",") if d]


def curve_rows(runs: Sequence[tuple[str, Sequence[str]]]) -> list[dict[str, object]]:
    """One row per (run, step): each column's estimate and interval."""
    rows: list[dict[str, object]] = []
    for label, points in runs:
        for step, dirs in sorted((parse_point(p) for p in points), key=lambda p: p[0]):
            values = read_config(dirs)
            row: dict[str, object] = {"run": label, "step": step, "seeds": len(dirs), "samples": len(values["keys"])}
            for col in COLUMNS:
                est = bootstrap(values[col])
                row[col], row[f"{col}_lo"], row[f"{col}_hi"] = (round(v, 4) for v in (est.mean, est.lo, est.hi))
            rows.append(row)
    return rows


def write_curve(rows: Sequence[dict[str, object]], out: Path, budget: int = 1500) -> list[Path]:
    from cag.utils import plots  # local: matplotlib is a slow import

    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "binding_curve.csv"
    fields = ["run", "step", "seeds", "samples", *(f"{c}{s}" for c in COLUMNS for s in ("", "_lo", "_hi"))]
    with csv_path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fields)
        writer.writeheader()
        writer.writerows(rows)
    fig, axes = plots.figure(1, 2, figsize=(10.5, 4.2))
    for ax, col in zip(axes[0], ("bound", "swapped"), strict=True):
        for label in dict.fromkeys(str(r["run"]) for r in rows):
            mine = [r for r in rows if r["run"] == label]
            steps = [r["step"] for r in mine]
            mid = [float(r[col]) for r in mine]
            err = [[m - float(r[f"{col}_lo"]) for m, r in zip(mid, mine, strict=True)],
                   [float(r[f"{col}_hi"]) - m for m, r in zip(mid, mine, strict=True)]]
            ax.errorbar(steps, mid, yerr=err, marker="o", capsize=3, label=label)
        ax.axhline(TARGETS[col], color="black", linestyle="--", linewidth=1)
        ax.text(ax.get_xlim()[0], TARGETS[col], f" target ({'≥' if col == 'bound' else '≤'} {TARGETS[col]})",
                va="bottom", fontsize="small")
        ax.set_ylim(0, 1)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{col} rate (share of subjects)")
        ax.axvline(budget, color="grey", linestyle=":", linewidth=1)
        ax.text(budget, 0.97, " study budget", va="top", fontsize="small", color="grey")
        plots.axes_title(ax, f"{col.capitalize()}, level-3 test split (95 % CI)")
    axes[0][1].legend(fontsize="x-small")
    png = out / "binding_curve.png"
    plots.save(fig, png)
    return [csv_path, png]


def main(argv: Sequence[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", nargs="+", action="append", required=True, metavar="LABEL STEP=EVAL_DIR",
                    help="a run's label, then its points")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", type=int, default=1500, help="steps of the study budget, drawn as a line (default 1500)")
    args = ap.parse_args(argv)
    runs = []
    for spec in args.run:
        if len(spec) < 2:
            ap.error(f"--run {' '.join(spec)}: give a label and at least one STEP=EVAL_DIR")
        runs.append((spec[0], spec[1:]))
    try:
        rows = curve_rows(runs)
    except (ValueError, FileNotFoundError) as exc:
        ap.error(str(exc))
    for r in rows:
        print(f"{r['run']:<40} step {r['step']:>6}: bound {r['bound']:.2f} [{r['bound_lo']:.2f}, {r['bound_hi']:.2f}]"
              f"  swapped {r['swapped']:.2f} [{r['swapped_lo']:.2f}, {r['swapped_hi']:.2f}]  subjects PF {r['pf_subjects']:.2f}")
    paths = write_curve(rows, args.out, args.budget)
    print("wrote " + ", ".join(map(str, paths)))
    return paths


if __name__ == "__main__":
    main()
