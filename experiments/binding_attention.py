"""Binding seen in attention: where each subject's figure tokens look, per layer.

    python experiments/binding_attention.py CKPT [CKPT ...] [--labels a,b] [--n 100] [--synthetic level3]
        [--set ground_places=true] [--sigmas 0.3,0.6,0.9] [--by-slot-order]

The binding rates (``experiments/proxy_breakdown.py``) say whether a figure wears its own
reference's colours; this says through which keys it could have got them. For each test sample
with two or more subjects, each subject's target tokens are noised to each sigma and the model
denoises them; ``cag.attention_maps.figure_attention`` records, per layer, the attention mass
those figure tokens put on each subject's reference (its figure box), name phrase and place words.
Per sample and kind: own share = mass on the subject's own keys / (own + the mean over the other
subjects'); 0.5 means the figure cannot tell its subject's keys from the others'. Printed with
95 % bootstrap intervals over samples, beside the total mass on that kind of key.

The chain a text-given binding needs is figure → its place words → the reference those words
carry (eq. 9 with place groundings) or figure → its own reference directly; a run whose own share
is 0.5 on every kind in every layer has no route to bind by.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from cag.attention_maps import FIGURE_TARGETS, figure_attention
from cag.data.sources import synthetic_config
from cag.data.synthetic import generate_sample
from cag.generate import load_model_for_inference
from experiments.proxy_breakdown import slot_order
from experiments.stats import bootstrap

ROOT = Path(__file__).resolve().parents[1]


def synthetic_settings(level: str, overrides: list[str]) -> dict:
    """A conf/synthetic option (or YAML file) with ``key=value`` overrides, as the evaluation would compose it."""
    path = Path(level) if level.endswith((".yaml", ".yml")) else ROOT / "conf" / "synthetic" / f"{level}.yaml"
    if not path.is_file():
        raise SystemExit(f"--synthetic {level}: {path} does not exist")
    base = OmegaConf.load(path)
    for item in overrides:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected key=value")
        key = item.split("=", 1)[0]
        if key not in base:
            raise SystemExit(f"--set {item!r}: {key!r} is not a key of {path.name} ({sorted(base)})")
    base = OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))  # typed as on a Hydra command line
    return OmegaConf.to_container(base, resolve=True)


def own_shares(mass: torch.Tensor) -> np.ndarray:
    """``[layers, kinds]`` mean over a sample's subjects of own / (own + mean of the others), from ``[L, i, k, j]``."""
    n = mass.shape[1]
    own = torch.stack([mass[:, i, :, i] for i in range(n)], dim=1)  # [L, i, k]
    others = torch.stack([mass[:, i, :, [j for j in range(n) if j != i]].mean(dim=-1) for i in range(n)], dim=1)
    share = own / (own + others)
    return torch.nanmean(share, dim=1).numpy()


def measure(checkpoint: Path, synthetic: dict, n: int, sigmas: list[float]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Own shares and total masses (each ``[samples, layers, kinds]``) on the test split, and the samples' keys."""
    model, info = load_model_for_inference(checkpoint)
    model.eval()
    cfg = synthetic_config(synthetic)
    shares, masses, keys = [], [], []
    for index in range(n):
        sample = generate_sample("test", index, cfg)
        if len(sample.truth.subjects) < 2:
            continue
        mass = figure_attention(model, sample, sigmas=sigmas, seed=index, image_size=int(info["image_size"]),
                                vlm_image_size=int(info["vlm_image_size"]))
        shares.append(own_shares(mass))
        keys.append(sample.key)
        masses.append(torch.nansum(mass, dim=-1).mean(dim=1).numpy())  # [layers, kinds]: all subjects' keys
    if not shares:
        raise SystemExit(f"{checkpoint}: none of the first {n} test samples has two subjects")
    return np.stack(shares), np.stack(masses), keys


def table(rows: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    head = ("| run | layer | samples | " + " | ".join(f"{k}: own share" for k in FIGURE_TARGETS) + " | "
            + " | ".join(f"{k}: mass" for k in FIGURE_TARGETS) + " |")
    lines = [head, "|" + "---|" * (3 + 2 * len(FIGURE_TARGETS))]
    for label, (shares, masses) in rows.items():
        for layer in range(shares.shape[1]):
            cells = []
            for k in range(len(FIGURE_TARGETS)):
                est = bootstrap(shares[None, :, layer, k])
                cells.append(f"{est.mean:.3f} [{est.lo:.3f}, {est.hi:.3f}]")
            cells += [f"{np.nanmean(masses[:, layer, k]):.3f}" for k in range(len(FIGURE_TARGETS))]
            lines.append(f"| {label} | {layer} | {shares.shape[0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--labels", default=None, help="comma-separated row names (default: the run folders' names)")
    ap.add_argument("--n", type=int, default=100, help="first N samples of the test split (default 100)")
    ap.add_argument("--synthetic", default="level3", help="conf/synthetic option or YAML file (default level3)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a synthetic key, e.g. --set ground_places=true (repeatable)")
    ap.add_argument("--by-slot-order", action="store_true",
                    help="also split the samples by whether the references stand left to right in their order")
    ap.add_argument("--sigmas", default="0.3,0.6,0.9", help="noise levels of the target (default 0.3,0.6,0.9)")
    args = ap.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [c.parent.parent.name for c in args.checkpoints]
    if len(labels) != len(args.checkpoints):
        raise SystemExit(f"--labels names {len(labels)} runs, {len(args.checkpoints)} checkpoints were given")
    for c in args.checkpoints:
        if not c.is_file():
            raise SystemExit(f"{c}: no such checkpoint")
    synthetic = synthetic_settings(args.synthetic, args.set)
    sigmas = [float(x) for x in args.sigmas.split(",")]
    measured = {lab: measure(c, synthetic, args.n, sigmas) for lab, c in zip(labels, args.checkpoints, strict=True)}
    print(table({lab: (sh, ma) for lab, (sh, ma, _) in measured.items()}))
    if args.by_slot_order:  # a model that binds by reference slot looks at its own reference only in the first group
        split = {}
        for lab, (sh, ma, keys) in measured.items():
            order = slot_order(synthetic, np.asarray(keys))
            for name, mask in (("references left to right", order == 1.0), ("references in another order", order == 0.0)):
                if mask.any():
                    split[f"{lab}: {name}"] = (sh[mask], ma[mask])
        print()
        print(table(split))


if __name__ == "__main__":
    main()
