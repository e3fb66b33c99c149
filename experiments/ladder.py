"""The difficulty ladder: where the tiny model stops learning, level by level, with binding measured directly.

    python experiments/ladder.py                                   # levels 0-4, study preset, 300 test samples each
    python experiments/ladder.py --levels 0,3 --no-colour-words    # the same levels, colours left out of the text
    python experiments/ladder.py --levels 3 --init-from BASE.ckpt --out outputs/experiments/ladder_ft   # fine-tunes
    python experiments/ladder.py --levels 0 --preset default --steps 6 --n-eval 4 --num-steps 4 \
        --train-override data.batch_size=2 --curve-every 3         # the CI-sized version

Each level (``conf/synthetic/level<k>.yaml``: one subject in the centre at a medium shot, then
the place from the text, the shot scale, two subjects, three) is trained once per seed with
``synthetic@data.synthetic=level<k>`` (training characters only) and evaluated on that level's
own test split (unseen characters). ``--no-colour-words`` sets
``data.synthetic.describe_colours=false`` in training and evaluation: the instruction names each
subject and its place, so its looks can come only from its reference.

Outputs in ``--out``: ``ladder.md/.csv`` (per level: proxies, their parts — subjects, props,
scene — and the binding rates, each mean [95 % CI]), ``ladder_summary.json``, ``ladder.html``
(side by side), and ``ladder_curve.png/.csv``: subjects PF against training steps, one line per
level, from checkpoints kept every ``--curve-every`` steps and evaluated on ``--curve-n`` test
samples. Rerunning the same command skips finished training and evaluations and resumes an
interrupted training from its ``last.ckpt``.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments import pipeline, sweep
from experiments.sweep import Config, TrainedRun

NAME = "ladder"
PREFIX = "eval"
LEVELS = (0, 1, 2, 3, 4)
WHAT = {
    0: "1 subject, centre, medium shot",
    1: "+ place from the text",
    2: "+ shot scale from the text",
    3: "2 subjects (today's benchmark)",
    4: "3 subjects",
}
CURVE_PREFIX = "curve"


def level_config(level: int, colour_words: bool, attention: str = "masked") -> Config:
    data = [f"synthetic@data.synthetic=level{level}"]
    label = f"level {level}"
    if not colour_words:
        data.append("data.synthetic.describe_colours=false")
        label += " no colours"
    if attention != "masked":
        label += f" {attention} attention"
    params = (("data/synthetic/num_characters", str((1, 1, 1, 2, 3)[level])),
              ("data/synthetic/place", "centre" if level == 0 else "text"),
              ("data/synthetic/shot", "medium" if level in (0, 1) else "text"),
              ("data/synthetic/describe_colours", str(colour_words)))
    experiment = "experiment=ablation_mask" if attention == "masked" else "experiment=baseline"  # no VAE dropout
    return Config(attention, 0.0, label, (experiment, *data), params=params, eval_overrides=tuple(data))


def configs_for(levels: Sequence[int], colour_words: bool, attention: str = "masked") -> list[Config]:
    return [level_config(v, colour_words, attention) for v in levels]


def _curve_override(every: int) -> str:
    """Keep a checkpoint every ``every`` steps beside last.ckpt, for the learning curve."""
    return (f"+callbacks.curve_checkpoints={{_target_:lightning.pytorch.callbacks.ModelCheckpoint,"
            f"dirpath:'${{paths.output_dir}}/checkpoints/curve',filename:'curve-step{{step:06d}}',"
            f"every_n_train_steps:{every},save_top_k:-1,auto_insert_metric_name:false}}")


def curve_points(runs: Sequence[TrainedRun], args: argparse.Namespace) -> list[dict[str, object]]:
    """Evaluate every kept checkpoint of every run on ``--curve-n`` samples (skipped when done earlier)."""
    points = []
    for run in runs:
        folder = Path(run.checkpoint).parent / "curve"
        for ckpt in sorted(folder.glob("curve-step*.ckpt")):
            step = int(re.search(r"step(\d+)", ckpt.stem).group(1))  # type: ignore[union-attr]
            point = TrainedRun(run.config, run.seed, run.run_id, str(ckpt))
            prefix = f"{CURVE_PREFIX}{step}"
            sub = argparse.Namespace(**{**vars(args), "n_eval": args.curve_n})
            sweep.ensure_evaluated(point, sub, args.out / "curve", prefix, list(run.config.eval_overrides))
            points.append({"level": run.config.label, "seed": run.seed, "step": step, "prefix": prefix,
                           "run_id": run.run_id})
    client = sweep.mlflow_client(args.tracking_uri)
    for p in points:
        metrics = client.get_run(str(p["run_id"])).data.tags.get(f"{p['prefix']}/run_id")
        data = client.get_run(metrics).data.metrics if metrics else {}
        p["proxy_PF_subjects"] = data.get("proxy_PF_subjects")
        p["proxy_SC_subjects"] = data.get("proxy_SC_subjects")
        p["proxy_Overall"] = data.get("proxy_Overall")
    return points


def write_curve(points: Sequence[dict[str, object]], out: Path) -> list[Path]:
    from cag.utils import plots  # local: matplotlib is a slow import

    csv_path = out / "ladder_curve.csv"
    with csv_path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, ["level", "seed", "step", "proxy_PF_subjects", "proxy_SC_subjects",
                                     "proxy_Overall"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(points)
    fig, axes = plots.figure(figsize=(6.4, 4.2))
    ax = axes[0][0]
    for level in sorted({str(p["level"]) for p in points}):
        mine = sorted((p for p in points if p["level"] == level and p["proxy_PF_subjects"] is not None),
                      key=lambda p: (p["step"], p["seed"]))
        if mine:
            ax.plot([p["step"] for p in mine], [p["proxy_PF_subjects"] for p in mine], marker="o", label=level)
    ax.set_xlabel("training step")
    ax.set_ylabel("subjects PF (proxy, 0-10)")
    ax.set_ylim(0, 10)
    plots.axes_title(ax, "Subjects PF (proxy) against training steps, one line per ladder level")
    ax.legend(fontsize="small")
    png = out / "ladder_curve.png"
    plots.save(fig, png)
    return [csv_path, png]


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_common_args(parser, NAME)
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="comma-separated ladder levels (0-4)")
    parser.add_argument("--no-colour-words", action="store_true",
                        help="instructions name each subject and its place only (data.synthetic.describe_colours=false)")
    parser.add_argument("--curve-every", type=int, default=500, help="keep a checkpoint every N steps for the curve")
    parser.add_argument("--curve-n", type=int, default=100, help="test samples per learning-curve point")
    parser.add_argument("--attention", choices=("masked", "full"), default="masked",
                        help="masked (experiment=ablation_mask, the tiny default) or full (experiment=baseline)")
    args = parser.parse_args(argv)
    sweep.apply_start(args, parser)  # --init-from: fine-tune every level (docs/design.md, 'Fine-tuning from a base (init_from)')
    levels = [int(v) for v in args.levels.split(",")]
    if bad := [v for v in levels if v not in LEVELS]:
        parser.error(f"--levels {bad}: the ladder has levels {list(LEVELS)}")
    # --rows (shared with the other studies) picks among the levels' rows, e.g. --rows "level 3"
    configs = pipeline.select_rows(configs_for(levels, not args.no_colour_words, args.attention), args.rows, parser)
    args.train_override = [*args.train_override, _curve_override(args.curve_every)]

    def build(runs: Sequence[TrainedRun], out: Path, a: argparse.Namespace) -> list[Path]:
        files = pipeline.standard_outputs(
            runs, out, a, name=NAME, title="Difficulty ladder: where the tiny model stops learning",
            head=["Level", "what it adds"], row_head=lambda c: [c.label, WHAT[int(c.label.split()[1])]],
            comparisons=(), note="Each level is trained on its own training split and tested on its own test split.")
        return [*files, *write_curve(curve_points(runs, a), out)]

    try:
        return pipeline.run_pipeline(args, name=NAME, configs=configs, metric_prefix=PREFIX, eval_overrides=(),
                                   build=build)
    except sweep.Interrupted as exc:
        print(str(exc), file=sys.stderr, flush=True)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
