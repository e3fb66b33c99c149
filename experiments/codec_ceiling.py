"""The highest proxy scores a model can reach through its codec: each level's test targets, encoded and decoded.

    python experiments/codec_ceiling.py                        # the shipped codec, levels 0-4, 300 samples each
    python experiments/codec_ceiling.py --channels 12 24 48    # also codecs refitted with more components

A generated image is always a decoded latent, so whatever the codec loses from the true target no
training can recover: the target passed through ``encode -> decode`` (at the model's image size,
as training sees it) is the best image a perfect DiT could produce. Scored with the same proxies
and references as ``evaluation/run.py``, it is the ceiling of every score in the ladder and the
base's model card; the untouched target at the model's size is the proxies' own ceiling.
Writes ``codec_ceiling.md`` / ``.json`` (mean [95 % bootstrap interval over test samples]).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from cag.data.batching import square, to_image, to_pixels
from cag.data.sources import synthetic_config
from cag.data.synthetic import SyntheticConfig, generate_split
from cag.models.codec import LatentCodec, LinearPatchCodec, codec_weights_path, fit_linear_patch_codec
from evaluation import proxies
from experiments import stats

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("pf_subjects", "sc_subjects", "pf_props", "sc_scene")
HEAD = ("proxy_pf", "proxy_sc", "proxy_overall")


def level_config(level: int) -> SyntheticConfig:
    return synthetic_config(OmegaConf.load(ROOT / "conf" / "synthetic" / f"level{level}.yaml"))


def refit(channels: int, image_size: int, n: int, factor: int = 4) -> LinearPatchCodec:
    """A codec with ``channels`` components fitted as ``src/fit_codec.py`` does: training targets and references."""
    images = []
    for s in generate_split("train", n, level_config(3)):
        images += [to_pixels(square(im, image_size)) for im in (s.target, *s.references)]
    return fit_linear_patch_codec(torch.stack(images), factor, channels)


def scores(image, sample) -> dict[str, float | None]:
    pf = proxies.prompt_following_details(image, sample.truth)
    sc = proxies.subject_consistency_details(image, sample.references, sample.truth)
    head = proxies.scores_from_details(pf, sc)
    parts = proxies.proxy_parts(pf, sc, sample.truth)
    return {**{f"proxy_{k}": head[k] for k in ("pf", "sc", "overall")}, **{k: None if parts[k] is None else 10.0 * parts[k] for k in PARTS}}


def measure(level: int, n: int, image_size: int, codecs: dict[str, LatentCodec | None]) -> dict[str, dict[str, list[float]]]:
    rows: dict[str, dict[str, list[float]]] = {name: {k: [] for k in (*HEAD, *PARTS)} for name in codecs}
    for s in generate_split("test", n, level_config(level)):
        target = square(s.target, image_size)
        for name, codec in codecs.items():
            if codec is None:
                image = target
            else:
                with torch.no_grad():
                    image = to_image(codec.decode(codec.encode(to_pixels(target)[None]))[0])
            for k, v in scores(image, s).items():
                rows[name][k].append(float("nan") if v is None else float(v))
    return rows


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=int(OmegaConf.load(ROOT / "conf/model/tiny.yaml").image_size))
    parser.add_argument("--channels", type=int, nargs="*", default=[], help="also refit codecs with these components")
    parser.add_argument("--fit-samples", type=int, default=200, help="training samples a refitted codec sees")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "codec_ceiling")
    args = parser.parse_args(argv)
    codecs: dict[str, LatentCodec | None] = {"target (no codec)": None,
                                            "shipped codec (12 components)": LinearPatchCodec.load(codec_weights_path("tiny_linear_f4c12"))}
    for c in args.channels:
        codecs[f"refitted, {c} components"] = refit(c, args.image_size, args.fit_samples)
    result: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for level in args.levels:
        rows = measure(level, args.n, args.image_size, codecs)
        result[f"level{level}"] = {
            name: {k: (lambda e: {"mean": round(e.mean, 3), "lo": round(e.lo, 3), "hi": round(e.hi, 3)})(
                stats.bootstrap(np.asarray(v)[None, :])) for k, v in cols.items() if np.isfinite(v).any()}
            for name, cols in rows.items()}
        print(f"level {level}: " + "; ".join(f"{name} subjects PF {r['pf_subjects']['mean']:.2f} SC {r['sc_subjects']['mean']:.2f}"
                                              for name, r in result[f"level{level}"].items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "codec_ceiling.json").write_text(json.dumps({"n": args.n, "image_size": args.image_size,
                                                             "results": result}, indent=2) + "\n")
    cols = (*HEAD, *PARTS)
    lines = [f"Ceiling of the proxies at the model's image size ({args.image_size} px), {args.n} test samples per level; "
             "mean [95 % bootstrap interval].", "",
             "| level | image | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for level, by_codec in result.items():
        for name, r in by_codec.items():
            lines.append(f"| {level} | {name} | " + " | ".join(
                f"{r[k]['mean']:.2f} [{r[k]['lo']:.2f}, {r[k]['hi']:.2f}]" if k in r else "—" for k in cols) + " |")
    md = args.out / "codec_ceiling.md"
    md.write_text("\n".join(lines) + "\n")
    print(md.read_text())
    return md


if __name__ == "__main__":
    main()
