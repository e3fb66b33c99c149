"""Where a proxy score comes from: subjects against props and scene, per evaluation run.

    python experiments/proxy_breakdown.py EVAL_DIR[,EVAL_DIR ...] [...] [--labels a,b] [--paired] [--by-slot-order]

Reads each run's ``results.jsonl`` (written by ``python evaluation/run.py``) and prints the
headline proxies beside their parts (``evaluation.proxies.proxy_parts``): PF of the subjects,
PF of the props, SC of the subjects and SC of the scene, each on the 0-10 scale, and the binding
rates (bound / swapped / missing, `evaluation.proxies.binding_details`), each with a
bootstrap interval over test samples. Why it exists: the headline averages subjects and props
together, so copying the scene reference alone scores about 3.6 while a subject that is drawn
entirely wrong costs only part of the score; the parts show which half of the task moved.
Results written before the parts existed have no ``parts`` entry and are refused by name.
``--by-slot-order`` splits each run's samples of two or more subjects by whether their references
stand left to right in reference order (rebuilt from the synthetic generator with the evaluation's
own config): a model that binds by reference slot instead of reading the text binds the first group
and swaps the second.
A comma-joined argument (``seed0/eval,seed1/eval,seed2/eval``) is one configuration trained with
several seeds: its row and its paired difference use the two-way bootstrap over training seeds and
test samples (``experiments.stats``), as the study tables do, so an interval covers a new seed as well
as a new test split; two configurations pair their seeds in the order given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from evaluation.proxies import binding_rates
from experiments.stats import bootstrap

PARTS = ("pf_subjects", "pf_props", "sc_subjects", "sc_scene")
HEADLINE = ("proxy_pf", "proxy_sc", "proxy_overall")
ROOT = Path(__file__).resolve().parents[1]
BINDING = ("bound", "swapped", "missing")  # share of a sample's subjects (0-1; NaN with one subject)


def read_parts(eval_dir: Path) -> dict[str, np.ndarray]:
    """Per-sample headline proxies and parts (0-10; NaN where a sample has no such entity)."""
    path = eval_dir / "results.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.jsonl (run `python evaluation/run.py` first)")
    rows: dict[str, list[float]] = {k: [] for k in (*HEADLINE, *PARTS, *BINDING)}
    keys: list[str] = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        rec = json.loads(line)
        proxy = (rec.get("details") or {}).get("proxy") or {}
        if "proxy_error" in proxy or rec["scores"].get("proxy_overall") is None:
            continue
        if "parts" not in proxy:
            raise ValueError(f"{path}:{line_no} (sample {rec.get('key')!r}) has no proxy parts: re-run the evaluation")
        keys.append(str(rec["key"]))
        for k in HEADLINE:
            rows[k].append(float(rec["scores"][k]))
        for k in PARTS:
            v = proxy["parts"].get(k)
            rows[k].append(10.0 * float(v) if v is not None else float("nan"))
        rates = binding_rates([proxy.get("binding") or {}])  # results from before the binding metric: none
        for k in BINDING:
            rows[k].append(float("nan") if rates[k] is None else rates[k])
    if not rows["proxy_overall"]:
        raise ValueError(f"{path}: no sample has proxy scores")
    out = {k: np.asarray(v, dtype=float) for k, v in rows.items()}
    out["keys"] = np.asarray(keys)
    return out


def read_config(eval_dirs: list[Path]) -> dict[str, np.ndarray]:
    """One configuration's runs (one per training seed) as ``[seeds, samples]`` arrays on the samples all share.

    The samples keep the first run's order; a sample some seed did not score is left out of every seed,
    so the rows stay paired across seeds.
    """
    runs = [read_parts(d) for d in eval_dirs]
    shared = set.intersection(*(set(r["keys"].tolist()) for r in runs))
    keys = [k for k in runs[0]["keys"].tolist() if k in shared]
    if not keys:
        raise ValueError(f"{', '.join(map(str, eval_dirs))}: the seeds share no test sample key")
    index = [{k: i for i, k in enumerate(r["keys"].tolist())} for r in runs]
    out = {col: np.stack([r[col][[ix[k] for k in keys]] for r, ix in zip(runs, index, strict=True)])
           for col in (*HEADLINE, *PARTS, *BINDING)}
    out["keys"] = np.asarray(keys)
    return out


def evaluation_synthetic(eval_dir: Path, fallback: str | None) -> dict:
    """The synthetic benchmark an evaluation scored: run_info.json's data block, else its Hydra config, else
    ``fallback`` (a conf/synthetic option name or a YAML file), for folders that record neither."""
    from omegaconf import OmegaConf  # local: only --by-slot-order needs it

    info_path, hydra_path = eval_dir / "run_info.json", eval_dir / ".hydra" / "config.yaml"
    data = json.loads(info_path.read_text()).get("data") if info_path.is_file() else None
    if data is None and hydra_path.is_file():
        data = OmegaConf.to_container(OmegaConf.load(hydra_path).data, resolve=True)
    if data is None:
        if fallback is None:
            raise SystemExit(f"{eval_dir}: neither run_info.json nor .hydra/config.yaml records the benchmark; "
                             "name it with --synthetic (e.g. --synthetic level3)")
        path = Path(fallback) if fallback.endswith((".yaml", ".yml")) else ROOT / "conf" / "synthetic" / f"{fallback}.yaml"
        if not path.is_file():
            raise SystemExit(f"--synthetic {fallback}: {path} does not exist")
        data = {"source": "synthetic", "synthetic": OmegaConf.to_container(OmegaConf.load(path), resolve=True)}
    if data.get("source") != "synthetic":
        raise SystemExit(f"{eval_dir}: data.source={data.get('source')!r}; --by-slot-order needs the synthetic benchmark")
    return dict(data["synthetic"])


def slot_order(synthetic: dict, keys: np.ndarray) -> np.ndarray:
    """Per sample: 1.0 when its subjects stand left to right in reference order, 0.0 when not, NaN for one subject."""
    from cag.data.sources import synthetic_config
    from cag.data.synthetic import generate_sample, position_x

    cfg = synthetic_config(synthetic)
    out = []
    for key in keys:
        split, index = str(key).rsplit("-", 1)
        xs = [position_x(p.position) for p in generate_sample(split, int(index), cfg).truth.subjects]
        out.append(float("nan") if len(xs) < 2 else float(xs == sorted(xs)))
    return np.asarray(out, dtype=float)


def split_by(values: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[..., mask] for k, v in values.items()}


def paired_table(a: dict[str, np.ndarray], b: dict[str, np.ndarray], label: str) -> str:
    """A − B on the test samples both runs scored (same keys), per column, with its bootstrap interval.

    Pairing is what makes two runs on the same test split comparable to a few hundredths: the same
    sample (and, in this platform, the same sampling noise) on both sides cancels out. With several
    seeds per side (``read_config``), seed i of A is paired with seed i of B and the interval is the
    two-way bootstrap over seeds and samples.
    """
    common = [k for k in a["keys"] if k in set(b["keys"])]
    if not common:
        raise ValueError("the two runs share no test sample key: nothing to pair")
    n_a, n_b = _seeds(a), _seeds(b)
    if n_a != n_b:
        raise ValueError(f"{label}: {n_a} seeds against {n_b}: a paired difference needs the same seeds on both sides")
    ia = {k: i for i, k in enumerate(a["keys"])}
    ib = {k: i for i, k in enumerate(b["keys"])}
    cells = []
    for col in (*HEADLINE, *PARTS, *BINDING):
        va, vb = np.atleast_2d(a[col]), np.atleast_2d(b[col])
        d = va[:, [ia[k] for k in common]] - vb[:, [ib[k] for k in common]]
        d = d[:, np.isfinite(d).any(axis=0)]  # samples no seed can pair (one subject: no binding) are left out
        if not d.size:
            cells.append("—")
            continue
        est = bootstrap(d, difference=True)
        cells.append(f"{est.mean:+.2f} [{est.lo:+.2f}, {est.hi:+.2f}]")
    cols = (*HEADLINE, *PARTS, *BINDING)
    return "\n".join(["| paired difference | n | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2),
                      f"| {label} | {_count(n_a, len(common))} | " + " | ".join(cells) + " |"])


def _seeds(values: dict[str, np.ndarray]) -> int:
    return int(np.atleast_2d(values["proxy_overall"]).shape[0])


def _count(seeds: int, samples: int) -> str:
    return str(samples) if seeds == 1 else f"{seeds} seeds × {samples}"


def breakdown_table(runs: dict[str, dict[str, np.ndarray]]) -> str:
    cols = (*HEADLINE, *PARTS, *BINDING)
    head = "| run | n | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for label, values in runs.items():
        cells = []
        for k in cols:
            if np.isnan(values[k]).all():
                cells.append("—")
                continue
            est = bootstrap(np.atleast_2d(values[k]))
            cells.append(f"{est.mean:.2f} [{est.lo:.2f}, {est.hi:.2f}]")
        lines.append(f"| {label} | {_count(_seeds(values), len(values['keys']))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("eval_dirs", nargs="+", metavar="EVAL_DIR[,EVAL_DIR...]",
                    help="an evaluation folder, or several joined by commas: one configuration's training seeds")
    ap.add_argument("--labels", default=None, help="comma-separated row names (default: the folder names)")
    ap.add_argument("--paired", action="store_true",
                    help="with two folders: also print their paired difference (first − second) on the shared samples")
    ap.add_argument("--by-slot-order", action="store_true",
                    help="also split each run by whether the references stand left to right in their order")
    ap.add_argument("--synthetic", default=None, metavar="LEVEL_OR_YAML",
                    help="with --by-slot-order: the benchmark of folders that do not record it (e.g. level3)")
    args = ap.parse_args(argv)
    configs = [[Path(p) for p in arg.split(",") if p] for arg in args.eval_dirs]
    labels = args.labels.split(",") if args.labels else default_labels(configs)
    if len(labels) != len(configs):
        raise SystemExit(f"--labels names {len(labels)} runs, {len(configs)} configurations were given")
    repeated = sorted({lab for lab in labels if labels.count(lab) > 1})
    if repeated:  # rows are keyed by label: a repeated one would silently drop a configuration
        raise SystemExit(f"--labels: {', '.join(map(repr, repeated))} names more than one configuration")
    parts = {lab: read_config(dirs) for lab, dirs in zip(labels, configs, strict=True)}
    print(breakdown_table(parts))
    if args.by_slot_order:
        rows = {}
        for (lab, values), dirs in zip(parts.items(), configs, strict=True):
            order = slot_order(evaluation_synthetic(dirs[0], args.synthetic), values["keys"])
            rows[f"{lab}: references left to right"] = split_by(values, order == 1.0)
            rows[f"{lab}: references in another order"] = split_by(values, order == 0.0)
        print()
        print(breakdown_table({k: v for k, v in rows.items() if len(v["keys"])}))
    if args.paired:
        if len(parts) != 2:
            raise SystemExit("--paired compares exactly two configurations (evaluation folders, or comma-joined seeds)")
        (la, a), (lb, b) = parts.items()
        print()
        print(paired_table(a, b, f"{la} − {lb}"))


def default_labels(configs: list[list[Path]]) -> list[str]:
    """Each configuration's first folder name, with as many parent folders as it takes to tell them apart.

    Sweeps name their folders ``<row>/seed<k>``, so two rows' seed-0 folders share a name.
    """
    for depth in range(1, 1 + max(len(dirs[0].resolve().parts) for dirs in configs)):
        labels = [_default_label(dirs, depth) for dirs in configs]
        if len(set(labels)) == len(labels):
            return labels
    return labels  # the same folder given twice: main() names it


def _default_label(dirs: list[Path], depth: int = 1) -> str:
    first = dirs[0].parent if dirs[0].name == "eval" else dirs[0]
    name = "/".join(first.resolve().parts[-depth:])
    return name if len(dirs) == 1 else f"{name} (+{len(dirs) - 1} seeds)"


if __name__ == "__main__":
    main()
