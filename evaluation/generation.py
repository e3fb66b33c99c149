"""The images of a model under evaluation: generated once, reused while nothing that decides them changes.

Generated images live in a folder keyed by everything that decides them (checkpoint file
identity, sampler, seed, sizes, benchmark), not in the timestamped run folder, so a
rerun, a larger ``n`` or a second judge reuses them. An image is reused only if its
``generations.jsonl`` line records the same settings and seed; missing images are
generated with the seed they would have had in a full run (``seed + index``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cag.checkpoints import read_checkpoint
from cag.data.sample import Sample
from cag.data.synthetic import SyntheticConfig
from evaluation.target import UNTRAINED, EvalTarget

GENERATIONS_FILE = "generations.jsonl"
SETTINGS_FILE = "settings.json"
# sampler fields whose value must match for a generated image to be reused
_REUSE_FIELDS = (
    "num_steps",
    "cfg_scale",
    "negative_prompt",
    "use_ref_latents",
    "attention",
    "ref_positions",
    "image_size",
    "vlm_image_size",
)


@dataclass
class GenerationOutcome:
    """Where the images are and how many had to be made now."""

    directory: Path
    records: dict[str, dict[str, Any]]
    generated: int
    reused: int
    model_info: dict[str, Any] = field(default_factory=dict)


def _file_identity(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {"checkpoint": UNTRAINED}
    st = path.stat()
    return {"checkpoint": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def generation_fingerprint(target: EvalTarget, settings: Mapping[str, Any]) -> str:
    """Short digest of everything that decides the images except the number of samples.

    ``n`` is left out on purpose: image ``i`` does not depend on how many others are
    generated (per-image seeds), so ``n=32`` after ``n=4`` reuses the first four.
    """
    payload = {**_file_identity(target.checkpoint), **settings}
    blob = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_generations(directory: Path) -> dict[str, dict[str, Any]]:
    path = directory / GENERATIONS_FILE
    if not path.is_file():
        return {}
    out: dict[str, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # an interrupted write; that image is regenerated
            out[str(rec.get("key"))] = rec
    return out


def _reusable(rec: Mapping[str, Any] | None, sample: Sample, seed: int, expected: Mapping[str, Any], directory: Path) -> bool:
    if rec is None or rec.get("seed") != seed or rec.get("instruction") != sample.instruction:
        return False
    if not (directory / f"{sample.key}.png").is_file():
        return False
    return all(rec.get(k) == v for k, v in expected.items())


def _contiguous(indices: Sequence[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def ensure_generations(
    target: EvalTarget,
    samples: Sequence[Sample],
    root: Path,
    *,
    sampler_cfg: Mapping[str, Any],
    seed: int,
    batch_size: int,
    data_cfg: Mapping[str, Any],
    model_cfg: Any = None,
    attention: str | None = None,
    ref_positions: str | None = None,
    progress: bool = True,
) -> GenerationOutcome:
    """Images for ``samples`` in ``root/<fingerprint>``, generating only those not already there.

    The model is loaded only when something is missing, so re-scoring finished images
    (a new judge, a new metric) does not pay for loading a 20 B-parameter model.
    """
    # local: cag.sampling loads diffusers and the model classes, the largest import of an evaluation,
    # which external-image runs and export.py never use
    from cag.sampling import sampler_from_settings

    trained_cfg = read_checkpoint(target.checkpoint)["hyper_parameters"]["model"] if target.checkpoint else model_cfg
    sampler = sampler_from_settings(sampler_cfg, trained_cfg)
    fp_settings = {
        "sampler": asdict(sampler),
        "seed": int(seed),
        "attention": attention,
        "ref_positions": ref_positions,
        # data.urls (shards), synthetic.ground_places and .train_roster joined the config later; left out at defaults
        # so earlier image folders stay valid
        "data": _fingerprint_data(data_cfg),
        "model": None if target.checkpoint is not None else model_cfg,
    }
    directory = Path(root) / generation_fingerprint(target, fp_settings)
    directory.mkdir(parents=True, exist_ok=True)
    existing = _read_generations(directory)
    settings_path = directory / SETTINGS_FILE
    stored = json.loads(settings_path.read_text(encoding="utf-8")) if settings_path.is_file() else None
    expected: dict[str, Any] | None = stored.get("expected") if stored else None

    missing = [
        i
        for i, s in enumerate(samples)
        if expected is None or not _reusable(existing.get(s.key), s, seed + i, expected, directory)
    ]
    info: dict[str, Any] = dict(stored.get("model_info", {})) if stored else {}
    if missing:
        # local: cag.generate adds Lightning, which a rerun that reuses every image does not need
        from cag.generate import generate_samples, load_model_for_inference

        model, info = load_model_for_inference(
            target.checkpoint, model_cfg if target.checkpoint is None else None, attention, ref_positions
        )
        image_size = int(info["image_size"])
        vlm_image_size = int(info["vlm_image_size"])
        for block in _contiguous(missing):
            # seed + block[0] keeps image i on seed + i, as if the whole list had been generated at once
            new = generate_samples(
                model,
                [samples[i] for i in block],
                directory,
                sampler=sampler,
                image_size=image_size,
                vlm_image_size=vlm_image_size,
                batch_size=batch_size,
                seed=seed + block[0],
                progress=progress,
                model_info=info,
            )
            for rec in new:
                rec["index"] = block[0] + int(rec["index"])
                existing[str(rec["key"])] = rec
        first = existing[samples[missing[0]].key]
        expected = {k: first.get(k) for k in _REUSE_FIELDS}
        _write_generations(directory, existing)
        del model
        settings_path.write_text(
            json.dumps(
                {"expected": expected, "fingerprint_of": fp_settings, "model_info": jsonable(info),
                 **_file_identity(target.checkpoint)},
                indent=2,
                default=str,
            ),
            encoding="utf-8",
        )
    return GenerationOutcome(
        directory=directory,
        records={s.key: existing[s.key] for s in samples},
        generated=len(missing),
        reused=len(samples) - len(missing),
        model_info=info,
    )


# SyntheticConfig fields added after image folders were first fingerprinted
_LATE_SYNTHETIC_KEYS = ("ground_places", "train_roster")


def _fingerprint_data(data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    data = {k: v for k, v in data_cfg.items() if k != "num_samples" and not (k == "urls" and v is None)}
    syn = data.get("synthetic")
    if isinstance(syn, Mapping):  # keys at their defaults stay out, so folders from before they existed stay valid
        defaults = {k: getattr(SyntheticConfig(), k) for k in _LATE_SYNTHETIC_KEYS}
        data["synthetic"] = {k: v for k, v in syn.items() if k not in defaults or v != defaults[k]}
    return data


def jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _write_generations(directory: Path, records: Mapping[str, Mapping[str, Any]]) -> None:
    """generate_samples rewrites generations.jsonl per call; this restores the line of every image in the folder."""
    tmp = directory / (GENERATIONS_FILE + ".tmp")
    ordered = sorted(records.values(), key=lambda r: (int(r.get("index", 0)), str(r.get("key"))))
    with tmp.open("w", encoding="utf-8") as fh:
        for rec in ordered:
            fh.write(json.dumps(rec, default=str) + "\n")
    os.replace(tmp, directory / GENERATIONS_FILE)
