"""Export the test set for other methods: ``python evaluation/export.py out=FOLDER [n=300] [data.source=...]``.

Comparing CAG with UNO, OmniGen2, Qwen-Image-Edit and friends (the paper's Table 1) means
running their code on our test samples. Their code should not have to install this
project, so the test set goes out as a plain folder:

* ``references/<key>-ref<k>.png``: the reference images, subjects first, scene last;
* ``samples.jsonl``: one JSON object per sample (``key``, ``instruction``, ``references``
  as file names relative to the folder, ``task_type``, ``groundings``). It is also a valid
  manifest of :mod:`cag.data.manifest`, so ``data.source=manifest
  data.manifest=FOLDER/samples.jsonl`` reads the export back;
* ``README.md``: what to produce (``<key>.png`` per sample in one folder) and how it is scored;
* ``export.json``: the data settings the samples came from, for the record.

Samples come from the same readers the evaluation uses (:func:`evaluation.runner.load_benchmark`
over the synthetic generator, a manifest or shards), so the folder holds exactly the samples
``python evaluation/run.py images=...`` later scores.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from cag.data.sample import Sample
from evaluation.runner import EvaluationError, external_image_size, load_benchmark

log = logging.getLogger("evaluation.export")

SAMPLES_FILE = "samples.jsonl"
INFO_FILE = "export.json"
REFERENCES_DIR = "references"
EXPORT_FORMAT = 1


def sample_line(sample: Sample, reference_names: Sequence[str]) -> dict[str, Any]:
    """The JSONL line of one sample: only manifest fields, so the export stays a readable manifest."""
    return {
        "key": sample.key,
        "instruction": sample.instruction,
        "references": list(reference_names),
        "task_type": sample.task_type,
        "groundings": [g.to_json() for g in sample.groundings],
    }


def _readme(n: int, first_key: str, size: int | None, n_refs: tuple[int, int], score_args: str) -> str:
    size_text = (
        f"Images are scored at {size} x {size} pixels: any other size is centre-cropped to a square and "
        f"resized with bicubic interpolation before scoring, so produce square {size} x {size} images to be "
        "scored exactly as you made them."
        if size
        else "Images are scored at the size you produce them."
    )
    refs = str(n_refs[0]) if n_refs[0] == n_refs[1] else f"{n_refs[0]}-{n_refs[1]}"
    return f"""# Test set for multi-subject generation ({n} samples)

Produce one image per line of `{SAMPLES_FILE}`:

- input: `instruction` (text) and `references` (PNG files in `{REFERENCES_DIR}/`, {refs} per
  sample). "Fig. k" in the instruction is the k-th file of `references`; subjects come first, the
  last reference is the scene. `groundings` (optional to use) binds instruction phrases to boxes in
  the references (`image_id` 1-based, `bbox_2d` = x1, y1, x2, y2 on a 0-1000 scale).
- output: one RGB image named `<key>.png` (JPEG / WebP as `<key>.jpg` / `<key>.webp` are read too),
  all in one folder, e.g. `{first_key}.png`. No sub-folders.

{size_text} A missing or unreadable image is reported by name and left out of the scores, never
scored as zero; the coverage of every metric is printed next to it.

Score the folder with the CAG platform:

    python evaluation/run.py images=/path/to/your/outputs method="Your method" {score_args}

`task_type` groups samples: scores are averaged per task type, then over task types.
"""


def export_test_set(
    samples: Sequence[Sample],
    out: str | Path,
    data_cfg: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    image_size: int | None = None,
) -> Path:
    """Write ``samples`` as a self-contained folder (see the module docstring); returns the JSONL path.

    An earlier export in ``out`` is refused unless ``overwrite``: a method's outputs may
    already have been made from it, and silently replacing the samples would score them
    against other references.
    """
    root = Path(out).expanduser().resolve()
    jsonl = root / SAMPLES_FILE
    if jsonl.exists() and not overwrite:
        raise EvaluationError(f"{jsonl} exists (an earlier export); pass overwrite=true to replace it")
    keys = [s.key for s in samples]
    if len(set(keys)) != len(keys):
        raise EvaluationError("the test set has duplicate sample keys; outputs named <key>.png would collide")
    if not samples:
        raise EvaluationError("no samples to export (n=0?)")
    (root / REFERENCES_DIR).mkdir(parents=True, exist_ok=True)
    tmp = jsonl.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for s in samples:
            names = []
            for k, ref in enumerate(s.references, start=1):
                name = f"{REFERENCES_DIR}/{s.key}-ref{k}.png"
                ref.convert("RGB").save(root / name, format="PNG")
                names.append(name)
            fh.write(json.dumps(sample_line(s, names), ensure_ascii=False) + "\n")
    tmp.replace(jsonl)
    counts = [len(s.references) for s in samples]
    (root / "README.md").write_text(
        _readme(
            len(samples),
            samples[0].key,
            image_size,
            (min(counts), max(counts)),
            score_arguments(root, data_cfg, len(samples)),
        ),
        encoding="utf-8",
    )
    info = {
        "format": EXPORT_FORMAT,
        "n": len(samples),
        "data": dict(data_cfg or {}),
        "scored_image_size": image_size,
        "task_types": sorted({s.task_type for s in samples}),
        "keys": keys,
    }
    (root / INFO_FILE).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
    return jsonl


# conf/synthetic/default.yaml's values: an export of another benchmark states the ones that differ
_SYNTHETIC_DEFAULTS = {"image_size": 128, "seed": 0, "num_characters": 2, "place": "text", "shot": "text",
                       "describe_colours": True}


def score_arguments(root: Path, data_cfg: Mapping[str, Any] | None, n: int) -> str:
    """Overrides that make ``evaluation/run.py`` score the samples of this export.

    The synthetic split is regenerated (it carries the ground truth the proxies need);
    any other source is read back from the export itself, which is a valid manifest.
    """
    data = dict(data_cfg or {})
    if data.get("source", "synthetic") == "synthetic":
        syn = data.get("synthetic") or {}
        extra = "".join(
            f" data.synthetic.{k}={v}"
            for k, v in syn.items()
            if k in _SYNTHETIC_DEFAULTS and v != _SYNTHETIC_DEFAULTS[k]
        )
        split = data.get("split", "test")
        return f"n={n}" + ("" if split == "test" else f" data.split={split}") + extra
    return f"n={n} data.source=manifest data.manifest={root / SAMPLES_FILE}"


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    data_cfg: dict[str, Any] = OmegaConf.to_container(cfg.data, resolve=True)  # type: ignore[assignment]
    try:
        samples = load_benchmark(data_cfg, cfg.n)
        path = export_test_set(
            samples, cfg.out, data_cfg, bool(cfg.overwrite), external_image_size("auto", data_cfg)
        )
    except EvaluationError as exc:
        log.error("%s", exc)
        sys.exit(2)
    print(
        f"exported {len(samples)} samples to {path.parent} ({path.name}, {REFERENCES_DIR}/, README.md)",
        flush=True,
    )


if __name__ == "__main__":
    main()
