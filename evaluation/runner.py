"""One evaluation of one model: find it, generate (or reuse) its images, score them, report, track.

``python evaluation/run.py`` is a thin Hydra shell around :func:`evaluate`; the experiment
scripts call :func:`evaluate` directly with a config composed from the same
``conf/evaluate.yaml``, so a table and a single evaluation can never disagree about what
"evaluate" means.

Decisions a reader of the numbers should know about:

* Every metric that cannot run here is reported as skipped with its reason (judge not
  configured, embedding weights not on disk, no ground truth for the proxies), printed, in
  ``summary.json`` and as MLflow tags. A skipped metric is "—" in the tables, never 0.
* Generated images live in a folder keyed by everything that decides them (checkpoint
  file identity, sampler, seed, sizes, benchmark), not in the timestamped run folder, so a
  rerun, a larger ``n`` or a second judge reuses them. An image is reused only if its
  ``generations.jsonl`` line records the same settings and seed; missing images are
  generated with the seed they would have had in a full run (``seed + index``).
* The judge's answers are cached on disk by the chat client, so a rerun costs no calls.
* The headline numbers are written onto the training run too (``eval/PF`` ...), so
  ``mlflow ui`` shows configurations and their scores side by side. Table 3's runs use
  another prefix (``eval_noref/``) so they do not overwrite the default evaluation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf
from PIL import Image

from cag.checkpoints import CHECKPOINT_NAME, CHECKPOINT_ROOTS, last_checkpoints
from cag.data.sample import Sample
from cag.data.sources import SampleSource, SourceError
from evaluation.report import (
    RunSummary,
    SampleResult,
    format_markdown_table,
    summarise,
    write_html,
    write_results_jsonl,
    write_sample_grid,
    write_summary_json,
    write_summary_tables,
)

log = logging.getLogger(__name__)

GENERATIONS_FILE = "generations.jsonl"
SETTINGS_FILE = "settings.json"
UNTRAINED = "untrained"
EXTERNAL = "external"
# file names accepted for an external image of sample <key>, in order of preference
EXTERNAL_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
NORMALISED_DIR = "normalised"
JUDGE_KEYS = ("pf", "sc", "overall")
EMBEDDING_KEYS = ("dino", "clip_i", "clip_t")
PROXY_KEYS = ("proxy_pf", "proxy_sc", "proxy_overall")
# metric key -> name in MLflow and the printed report (Table 1's column titles)
METRIC_NAMES = {
    "pf": "PF",
    "sc": "SC",
    "overall": "Overall",
    "dino": "DINO",
    "clip_i": "CLIP-I",
    "clip_t": "CLIP-T",
    "proxy_pf": "proxy_PF",
    "proxy_sc": "proxy_SC",
    "proxy_overall": "proxy_Overall",
}
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


class EvaluationError(RuntimeError):
    """The evaluation cannot run as configured; the message says what to change."""


# --------------------------------------------------------------------------- what to evaluate


@dataclass
class EvalTarget:
    """The model under evaluation: a checkpoint (and the training run that wrote it) or the untrained model."""

    checkpoint: Path | None
    train_run_id: str | None = None
    train_run_name: str | None = None
    found_by: str = "explicit"  # explicit | mlflow | filesystem | untrained | external
    method: str | None = None  # external images: the method that made them (row label, MLflow tag)
    images_dir: Path | None = None  # external images: the folder scored

    @property
    def external(self) -> bool:
        return self.found_by == EXTERNAL

    @property
    def label(self) -> str:
        """Row label of the summary table: the method of external images, the training run's name, else the checkpoint's folder."""
        if self.method:
            return self.method
        if self.checkpoint is None:
            return UNTRAINED
        if self.train_run_name:
            return self.train_run_name
        parent = self.checkpoint.parent
        return parent.parent.name if parent.name == "checkpoints" else parent.name


def _mlflow_client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _training_runs(client: Any, experiment: str) -> list[Any]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return list(client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=5000))


def _resolve(path: str | os.PathLike[str], base: Path) -> Path:
    p = Path(path).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def find_target(
    checkpoint: str | None,
    *,
    tracking_uri: str | None,
    train_experiment: str = "cag",
    base: str | os.PathLike[str] = ".",
    roots: Sequence[str] = CHECKPOINT_ROOTS,
    train_run_id: str | None = None,
) -> EvalTarget:
    """The checkpoint to evaluate and the MLflow training run it belongs to.

    ``checkpoint`` None means "the newest": the most recently written ``last.ckpt`` among
    the files under ``base/<roots>`` and the ``checkpoint/last`` tags of FINISHED runs
    of ``train_experiment`` (a run still training is not a result yet). ``"untrained"``
    is the randomly initialised model. An explicit path is matched to its run by the
    ``checkpoint/last`` / ``checkpoint/best`` tags, or by the run's ``output_dir``.
    """
    base_path = Path(base).resolve()
    if checkpoint == UNTRAINED:
        return EvalTarget(None, found_by=UNTRAINED)
    runs: list[Any] = []
    if tracking_uri:
        try:
            runs = _training_runs(_mlflow_client(tracking_uri), train_experiment)
        except Exception as exc:  # a broken or foreign store must not stop an evaluation of a file
            log.warning("could not read training runs from %s: %s", tracking_uri, exc)
    by_ckpt: dict[Path, Any] = {}
    for run in reversed(runs):  # newest run wins for a path written twice
        for tag in ("checkpoint/last", "checkpoint/best"):
            value = run.data.tags.get(tag)
            if value:
                by_ckpt[_resolve(value, base_path)] = run

    def run_for(path: Path) -> Any:
        if path in by_ckpt:
            return by_ckpt[path]
        for run in runs:
            # the tag is set when training ends; the param is logged at its start (a run still training)
            out = run.data.tags.get("output_dir") or run.data.params.get("paths/output_dir")
            if out and _resolve(out, base_path) in path.parents:
                return run
        return None

    if checkpoint is not None:
        path = _resolve(checkpoint, base_path)
        if not path.is_file():
            raise EvaluationError(f"checkpoint={checkpoint} does not exist (resolved to {path})")
        found_by = "explicit"
    else:
        candidates: dict[Path, str] = dict.fromkeys(last_checkpoints(base_path, roots), "filesystem")
        for run in runs:
            value = run.data.tags.get("checkpoint/last")
            if run.info.status == "FINISHED" and value:
                p = _resolve(value, base_path)
                if p.is_file():
                    candidates[p] = "mlflow"
        if not candidates:
            where = ", ".join(str(base_path / r) for r in roots)
            raise EvaluationError(
                f"no checkpoint to evaluate: no {CHECKPOINT_NAME} under {where} and no FINISHED run with a "
                f"'checkpoint/last' tag in MLflow experiment '{train_experiment}' at {tracking_uri}. "
                "Train first (python src/train.py), or pass checkpoint=<path> or checkpoint=untrained."
            )
        # a run that is still training rewrites its last.ckpt: prefer finished work, unless there is none
        def still_training(p: Path) -> bool:
            run = run_for(p)
            return run is not None and run.info.status == "RUNNING"

        settled = {p: how for p, how in candidates.items() if not still_training(p)}
        if settled:
            candidates = settled
        else:
            log.warning("every checkpoint found belongs to a run that is still RUNNING; evaluating the newest anyway")
        path = max(candidates, key=lambda p: p.stat().st_mtime)
        found_by = candidates[path]
    run = None
    if train_run_id:
        run = next((r for r in runs if r.info.run_id == train_run_id), None)
        if run is None:
            raise EvaluationError(f"train_run_id={train_run_id} is not a run of experiment '{train_experiment}'")
    else:
        run = run_for(path)
    return EvalTarget(
        checkpoint=path,
        train_run_id=run.info.run_id if run is not None else None,
        train_run_name=run.info.run_name if run is not None else None,
        found_by=found_by,
    )


# --------------------------------------------------------------------------- benchmark


def load_benchmark(data_cfg: Mapping[str, Any], n: int | None) -> list[Sample]:
    """The test samples of ``data:`` (synthetic split with ground truth for the proxies, shards, or a manifest).

    ``n`` None takes every sample of shards and manifests, ``data.num_samples`` (300) of the synthetic split.
    """
    try:
        source = SampleSource.from_config(data_cfg, prefix="data")
        if n is None and source.kind == "synthetic":
            n = int(data_cfg.get("num_samples", 300))
        return list(source.samples(n))
    except SourceError as exc:
        raise EvaluationError(str(exc)) from exc


# --------------------------------------------------------------------------- generation


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
    from cag.checkpoints import read_checkpoint
    from cag.sampling import sampler_from_settings

    trained_cfg = read_checkpoint(target.checkpoint)["hyper_parameters"]["model"] if target.checkpoint else model_cfg
    sampler = sampler_from_settings(sampler_cfg, trained_cfg)
    fp_settings = {
        "sampler": asdict(sampler),
        "seed": int(seed),
        "attention": attention,
        "ref_positions": ref_positions,
        # data.urls (shards) joined the config later; left out while unset so earlier image folders stay valid
        "data": {k: v for k, v in data_cfg.items() if k != "num_samples" and not (k == "urls" and v is None)},
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
                {"expected": expected, "fingerprint_of": fp_settings, "model_info": _jsonable(info),
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


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _write_generations(directory: Path, records: Mapping[str, Mapping[str, Any]]) -> None:
    """generate_samples rewrites generations.jsonl per call; this restores the line of every image in the folder."""
    tmp = directory / (GENERATIONS_FILE + ".tmp")
    ordered = sorted(records.values(), key=lambda r: (int(r.get("index", 0)), str(r.get("key"))))
    with tmp.open("w", encoding="utf-8") as fh:
        for rec in ordered:
            fh.write(json.dumps(rec, default=str) + "\n")
    os.replace(tmp, directory / GENERATIONS_FILE)


# --------------------------------------------------------------------------- external images


@dataclass
class ExternalImages:
    """What was found in a folder of another method's images, per sample key.

    ``paths`` holds the image each metric scores (the file itself, or its normalised copy);
    ``missing`` and ``unreadable`` name the samples that are not scored at all; ``extra``
    lists files in the folder that match no sample key (a naming mistake shows up here).
    """

    folder: Path
    size: int | None
    paths: dict[str, str] = field(default_factory=dict)
    original_size: dict[str, tuple[int, int]] = field(default_factory=dict)
    resized: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)

    def problem(self, key: str) -> str | None:
        """Why sample ``key`` is not scored, or None when it is."""
        if key in self.unreadable:
            return f"unreadable: {self.unreadable[key]}"
        if key in self.missing:
            return "missing: no " + " / ".join(f"{key}{sfx}" for sfx in EXTERNAL_SUFFIXES) + f" in {self.folder}"
        return None

    def summary(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "size_rule": f"centre-crop to square + bicubic resize to {self.size}" if self.size else "native size",
            "scored": len(self.paths),
            "missing": list(self.missing),
            "unreadable": dict(self.unreadable),
            "resized": len(self.resized),
            "extra_files": list(self.extra),
        }


def external_image_size(setting: Any, data_cfg: Mapping[str, Any]) -> int | None:
    """The size external images are scored at (None: their native size).

    ``auto`` means the synthetic benchmark's ``image_size`` (its proxies and our own
    generations are at that size, so every method is measured on the same pixel grid) and
    native size for manifest / shard test sets, whose size we do not know.
    """
    if setting is None or str(setting).lower() == "native":
        return None
    if str(setting).lower() == "auto":
        if data_cfg.get("source", "synthetic") == "synthetic":
            return int((data_cfg.get("synthetic") or {}).get("image_size", 128))
        return None
    try:
        size = int(setting)
    except (TypeError, ValueError):
        size = 0
    if isinstance(setting, bool) or size < 1:
        raise EvaluationError(f"image_size={setting!r} must be auto, native or a positive int")
    return size


def collect_external_images(
    samples: Sequence[Sample], folder: str | os.PathLike[str], out_dir: Path, size: int | None
) -> ExternalImages:
    """Match ``<key>.png`` (or .jpg/.jpeg/.webp) in ``folder`` to the samples; check and normalise each.

    The size rule: an image that is not ``size`` x ``size`` is centre-cropped to a square
    and resized with bicubic interpolation (:func:`cag.data.batching.square`, the
    platform's one resize policy), written as PNG to ``out_dir/normalised/<key>.png``, and
    every metric (judge included) scores that copy; an image already at ``size`` is scored
    as the file itself, byte for byte. ``size`` None scores every image at its native size.
    The folder is only read, never written.
    """
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise EvaluationError(f"images={folder} is not a folder (resolved to {root})")
    found = ExternalImages(folder=root, size=size)
    keys = {s.key for s in samples}
    for s in samples:
        path = next((root / f"{s.key}{sfx}" for sfx in EXTERNAL_SUFFIXES if (root / f"{s.key}{sfx}").is_file()), None)
        if path is None:
            found.missing.append(s.key)
            continue
        try:
            with Image.open(path) as im:
                im.load()
                image = im.copy()
        except Exception as exc:  # PIL raises many types for truncated or foreign files
            found.unreadable[s.key] = f"{path.name}: {type(exc).__name__}: {exc}"
            continue
        if image.width < 1 or image.height < 1:
            found.unreadable[s.key] = f"{path.name}: empty image {image.size}"
            continue
        found.original_size[s.key] = (image.width, image.height)
        if size is not None and image.size != (size, size):
            from cag.data.batching import square

            target = out_dir / NORMALISED_DIR / f"{s.key}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            square(image, size).save(target, format="PNG")
            found.paths[s.key] = str(target)
            found.resized.append(s.key)
        else:
            found.paths[s.key] = str(path)
    for p in sorted(root.iterdir()):
        if p.is_file() and p.suffix.lower() in EXTERNAL_SUFFIXES and p.stem not in keys:
            found.extra.append(p.name)
    return found


def save_targets(samples: Sequence[Sample], directory: Path) -> dict[str, str]:
    """Ground-truth images as PNG files next to the references, for the page and the grid; samples without one are left out."""
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}
    for s in samples:
        if s.target is not None:
            p = directory / f"{s.key}-target.png"
            if not p.is_file():
                s.target.save(p)
            out[s.key] = str(p)
    return out


def save_references(samples: Sequence[Sample], directory: Path) -> dict[str, list[str]]:
    """Reference images as PNG files (the judge sends files byte for byte; the HTML page shows them)."""
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[str]] = {}
    for s in samples:
        paths = []
        for k, ref in enumerate(s.references, start=1):
            p = directory / f"{s.key}-ref{k}.png"
            if not p.is_file():
                ref.save(p)
            paths.append(str(p))
        out[s.key] = paths
    return out


# --------------------------------------------------------------------------- judge


def judge_availability(judge_cfg: Mapping[str, Any]) -> tuple[bool, str | None]:
    """Whether the judge can run here, and if not, why (to print, store and tag).

    ``enabled: auto`` runs it when the API key variable is set or a ``base_url`` is
    configured and answers a TCP connect; ``true`` turns a missing judge into an error;
    ``false`` skips it.
    """
    enabled = judge_cfg.get("enabled", "auto")
    if enabled is False or str(enabled).lower() == "false":
        return False, "judge disabled (evaluation.judge.enabled=false)"
    client = judge_cfg.get("client") or {}
    env = str(client.get("api_key_env") or "OPENAI_API_KEY")
    base_url = client.get("base_url")
    reason: str | None = None
    if base_url:
        parsed = urlparse(str(base_url))
        host = parsed.hostname or ""
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((host, port), timeout=3.0):
                pass
        except OSError as exc:
            reason = f"judge server {parsed.scheme}://{host}:{port} is not reachable ({exc.__class__.__name__})"
        local = host in ("127.0.0.1", "localhost", "::1", "0.0.0.0")
        if reason is None and not local and not os.environ.get(env):
            reason = f"judge at {host} needs an API key: environment variable {env} is not set"
    elif not os.environ.get(env):
        reason = (
            f"no judge configured: environment variable {env} is not set and no judge base_url is given "
            "(set the key, or use evaluation/judge=local with an OpenAI-compatible server)"
        )
    if reason is not None and str(enabled).lower() == "true":
        raise EvaluationError(f"evaluation.judge.enabled=true but {reason}")
    return reason is None, reason


def run_judge(
    judge_cfg: Mapping[str, Any],
    samples: Sequence[Sample],
    generated: Mapping[str, str],
    references: Mapping[str, list[str]],
    out_path: Path,
    progress: bool = False,
) -> tuple[dict[str, Any], int, list[str]]:
    """PF / SC per sample -> (records by key, HTTP calls made, model names the API reported)."""
    import openai

    from cag.remote.batch import BatchChatClient, BatchPendingError
    from cag.remote.chat import ChatClient
    from evaluation.judge import JudgeItem, judge_items, write_jsonl

    client_cfg = {k: v for k, v in dict(judge_cfg.get("client") or {}).items()}
    mode = str(judge_cfg.get("mode", "online"))
    client: ChatClient
    if mode == "batch":
        client = BatchChatClient(**client_cfg, **dict(judge_cfg.get("batch") or {}))
    elif mode == "online":
        client = ChatClient(**client_cfg)
    else:
        raise EvaluationError(f"evaluation.judge.mode={mode!r} is not one of ['online', 'batch']")
    items = []
    for s in samples:
        scene = s.truth.scene.image_id if s.truth else None
        items.append(
            JudgeItem(
                key=s.key,
                instruction=s.instruction,
                references=[Path(p) for p in references[s.key]],
                generated=Path(generated[s.key]),
                task_type=s.task_type,
                scene_ref=int(scene) if scene else None,
            )
        )
    try:
        records = judge_items(
            items,
            client,
            criteria=list(judge_cfg.get("criteria") or ["PF", "SC"]),
            max_tokens=int(judge_cfg.get("max_tokens", 512)),
            chunk_size=int(judge_cfg.get("chunk_size", 64)),
            progress=progress,
        )
    except BatchPendingError as exc:
        raise EvaluationError(str(exc)) from exc
    except openai.APIStatusError as exc:
        # only the batch path gets here (the online client records per-request failures): a rejected key or
        # a lost batch endpoint while polling; the stored batch ids let a rerun pick up where this stopped
        raise EvaluationError(f"judge batch mode stopped: HTTP {exc.status_code} from the files/batches API") from exc
    write_jsonl(records, out_path)
    reported = sorted({m for r in records for m in r.model_reported.values() if m})
    return {r.key: r for r in records}, client.calls_made, reported


# --------------------------------------------------------------------------- scoring


def embedding_scores(
    metrics: Mapping[str, Any],
    samples: Sequence[Sample],
    generated: Mapping[str, str],
    batch_size: int = 16,
) -> dict[str, dict[str, float]]:
    """Per-sample DINO / CLIP-I / CLIP-T for the metrics that could be built (key -> metric -> value)."""
    out: dict[str, dict[str, float]] = {s.key: {} for s in samples}
    if not metrics:
        return out
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        images = [_open_rgb(generated[s.key]) for s in chunk]
        refs = [list(s.references) for s in chunk]
        prompts = [s.instruction for s in chunk]
        for name, metric in metrics.items():
            metric.update(images, refs, prompts)
            for s, v in zip(chunk, metric.last_values, strict=True):
                out[s.key][name] = float(v)
    return out


def _open_rgb(path: str | Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def proxy_sample_scores(sample: Sample, image: Image.Image) -> tuple[dict[str, float | None], dict[str, Any]]:
    """Judge-free PF / SC / Overall of one synthetic sample, or the error that prevented it."""
    from evaluation.proxies import (
        TruthError,
        prompt_following_details,
        proxy_scores,
        subject_consistency_details,
    )

    try:
        if sample.truth is None:
            raise TruthError(f"sample {sample.key!r} has no truth")
        scores = proxy_scores(image, sample.references, sample.truth)
        details = {
            "pf_per_entity": prompt_following_details(image, sample.truth),
            "sc_per_subject": subject_consistency_details(image, sample.references, sample.truth),
        }
    except Exception as exc:  # TruthError and friends: recorded per sample, never turned into a score
        return {k: None for k in PROXY_KEYS}, {"proxy_error": f"{type(exc).__name__}: {exc}"}
    return {"proxy_pf": scores["pf"], "proxy_sc": scores["sc"], "proxy_overall": scores["overall"]}, details


# --------------------------------------------------------------------------- the whole evaluation


@dataclass
class EvalOutcome:
    """What one evaluation produced; ``headline`` is what goes to MLflow and the printed report."""

    output_dir: Path
    target: EvalTarget
    rows: list[RunSummary]
    headline: dict[str, float]
    skipped: dict[str, str]
    files: dict[str, Path]
    generation: GenerationOutcome
    judge_calls: int = 0
    judge_models: list[str] = field(default_factory=list)
    eval_run_id: str | None = None
    external: ExternalImages | None = None


def _checkpoint_name(target: EvalTarget) -> str:
    """What the ``checkpoint`` tag / field says: a path, ``untrained``, or ``external:<folder>``."""
    if target.external:
        return f"{EXTERNAL}:{target.images_dir}"
    return str(target.checkpoint) if target.checkpoint else UNTRAINED


def _plain(cfg: Any) -> Any:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def evaluate(cfg: DictConfig | Mapping[str, Any]) -> EvalOutcome:
    """Run the evaluation described by a ``conf/evaluate.yaml`` config (see that file for every key)."""
    c: dict[str, Any] = _plain(cfg)  # type: ignore[assignment]
    out_dir = Path(c["output_dir"]).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = c.get("tracking_uri") if (c.get("mlflow") or {}).get("enabled", True) else None
    data_cfg = dict(c.get("data") or {})
    images_folder = c.get("images")
    external: ExternalImages | None = None
    if images_folder and c.get("checkpoint") not in (None, ""):
        raise EvaluationError("images= scores a folder of another method's images; drop checkpoint= (or images=)")
    if images_folder:
        # another method's images: nothing to find or generate, the folder is the model's output
        folder = Path(str(images_folder)).expanduser().resolve()
        method = str(c.get("method") or c.get("label") or folder.name)
        target = EvalTarget(None, found_by=EXTERNAL, method=method, images_dir=folder)
        log.info("scoring external images of method %r from %s", method, folder)
    else:
        target = find_target(
            c.get("checkpoint"),
            tracking_uri=tracking_uri,
            train_experiment=str(c.get("train_experiment", "cag")),
            base=c.get("base_dir") or ".",
            train_run_id=c.get("train_run_id"),
        )
        log.info("evaluating %s (%s, training run %s)", target.checkpoint or UNTRAINED, target.found_by,
                 target.train_run_id or "unknown")
    samples = load_benchmark(data_cfg, c.get("n"))
    if not samples:
        raise EvaluationError("the benchmark has no samples (n=0?)")
    if target.external:
        external = collect_external_images(
            samples, target.images_dir or ".", out_dir, external_image_size(c.get("image_size", "auto"), data_cfg)
        )
        gen = GenerationOutcome(
            directory=external.folder,
            records={k: {"key": k, "source": EXTERNAL, "original_size": list(v)}
                     for k, v in external.original_size.items()},
            generated=0,
            reused=len(external.paths),
        )
        generated = dict(external.paths)
        references = save_references(samples, out_dir / "references")
        if external.missing or external.unreadable:
            log.warning("%d of %d images missing, %d unreadable: not scored (named in run_info.json)",
                        len(external.missing), len(samples), len(external.unreadable))
        if not generated:
            raise EvaluationError(
                f"none of the {len(samples)} samples has a readable image in {external.folder} "
                f"(expected <key>.png, e.g. {samples[0].key}.png; see evaluation/export.py)"
            )
    else:
        gen = ensure_generations(
            target,
            samples,
            Path(c.get("generations_root") or out_dir / "generations").resolve(),
            sampler_cfg=c.get("sampler") or {},
            seed=int(c.get("seed", 0)),
            batch_size=int(c.get("batch_size", 4)),
            data_cfg=data_cfg,
            model_cfg=c.get("model"),
            attention=c.get("attention"),
            ref_positions=c.get("ref_positions"),
            progress=bool(c.get("progress", True)),
        )
        generated = {s.key: str(gen.directory / f"{s.key}.png") for s in samples}
        references = save_references(samples, gen.directory / "references")
    targets = save_targets(samples, (out_dir if target.external else gen.directory) / "references")
    # samples without a usable image are named and counted, never scored
    scorable = [s for s in samples if s.key in generated]
    skipped: dict[str, str] = {}

    # judge
    judge_cfg = dict((c.get("evaluation") or {}).get("judge") or {})
    judge_ok, judge_reason = judge_availability(judge_cfg)
    judge_records: dict[str, Any] = {}
    judge_calls, judge_models = 0, []
    if judge_ok:
        judge_records, judge_calls, judge_models = run_judge(
            judge_cfg, scorable, generated, references, out_dir / "judge.jsonl", progress=bool(c.get("progress", True))
        )
    else:
        for k in JUDGE_KEYS:
            skipped[k] = str(judge_reason)

    # DINO / CLIP
    metrics_cfg = c.get("metrics") or {}
    if metrics_cfg.get("enabled", True):
        from evaluation.metrics import build_metrics

        metrics, metric_skips = build_metrics(metrics_cfg)
        skipped.update(metric_skips)
    else:
        metrics = {}
        skipped.update({k: "embedding metrics disabled (metrics.enabled=false)" for k in EMBEDDING_KEYS})
    emb = embedding_scores(metrics, scorable, generated, int(metrics_cfg.get("batch_size", 16)))

    # judge-free proxies (synthetic data only)
    want_proxies = str(c.get("proxies", "auto")).lower()
    has_truth = all(s.truth for s in samples)
    run_proxies = want_proxies != "false" and has_truth
    if not run_proxies:
        reason = "proxies disabled (proxies=false)" if want_proxies == "false" else (
            "no ground truth: proxies need the synthetic benchmark's Sample.truth")
        skipped.update({k: reason for k in PROXY_KEYS})

    results: list[SampleResult] = []
    for s in samples:
        scores: dict[str, float | None] = {k: None for k in (*JUDGE_KEYS, *EMBEDDING_KEYS, *PROXY_KEYS)}
        record = gen.records.get(s.key) or {}
        details: dict[str, Any] = {"seed": record.get("seed")}
        if external is not None:
            details["image"] = external.problem(s.key) or "ok"
            if s.key in external.original_size:
                details["original_size"] = list(external.original_size[s.key])
                details["resized"] = s.key in external.resized
        if s.key not in generated:
            results.append(SampleResult(key=s.key, instruction=s.instruction, scores=scores, task_type=s.task_type,
                                        generated=None, references=references[s.key], details=details,
                                        target=targets.get(s.key)))
            continue
        rec = judge_records.get(s.key)
        if rec is not None:
            scores.update(rec.scores())
            details.update(rec.details())
        scores.update(emb.get(s.key, {}))
        if run_proxies:
            proxy, proxy_details = proxy_sample_scores(s, _open_rgb(generated[s.key]))
            scores.update(proxy)
            details["proxy"] = {**{METRIC_NAMES[k]: v for k, v in proxy.items()}, **proxy_details}
        results.append(
            SampleResult(
                key=s.key,
                instruction=s.instruction,
                scores=scores,
                task_type=s.task_type,
                generated=generated[s.key],
                references=references[s.key],
                details=details,
                target=targets.get(s.key),
            )
        )

    label = str(c.get("label") or target.label)
    # every skip (proxies included) goes into the main row, so summary.json names them all with their reasons
    main_row = summarise(label, results, skipped=dict(skipped))
    rows = [main_row]
    proxy_row = None
    if run_proxies:
        as_judge = [
            SampleResult(r.key, r.instruction, {k[len("proxy_"):]: r.scores.get(k) for k in PROXY_KEYS}, r.task_type)
            for r in results
        ]
        proxy_row = summarise(f"{label} (judge-free proxy)", as_judge)
        for k in EMBEDDING_KEYS:  # shown once, in the main row
            proxy_row.metrics[k] = None
        rows.append(proxy_row)

    headline: dict[str, float] = {}
    for k in (*JUDGE_KEYS, *EMBEDDING_KEYS):
        v = main_row.metrics.get(k)
        if v is not None:
            headline[METRIC_NAMES[k]] = float(v)
    if proxy_row is not None:
        for k in JUDGE_KEYS:
            v = proxy_row.metrics.get(k)
            if v is not None:
                headline[METRIC_NAMES[f"proxy_{k}"]] = float(v)
    for k in JUDGE_KEYS:
        valid, total = main_row.coverage.get(k, (0, len(results)))
        if k not in skipped:
            headline[f"coverage_{METRIC_NAMES[k]}"] = valid / total if total else 0.0

    files = {
        "results": write_results_jsonl(out_dir / "results.jsonl", results),
        "summary_json": write_summary_json(out_dir / "summary.json", rows),
    }
    files["summary_md"], files["summary_csv"] = write_summary_tables(out_dir / "summary", rows)
    files["html"] = write_html(
        out_dir / "report.html",
        results,
        image_root=out_dir,
        title=f"CAG evaluation: {label}",
        summary=rows,
        embed=bool(c.get("html_embed", True)),
    )
    grid = write_sample_grid(out_dir / "samples_grid.png", results, image_root=out_dir)
    if grid is not None:
        files["grid"] = grid
    if judge_ok:
        files["judge"] = out_dir / "judge.jsonl"
    outcome = EvalOutcome(
        output_dir=out_dir,
        target=target,
        rows=rows,
        headline=headline,
        skipped=skipped,
        files=files,
        generation=gen,
        judge_calls=judge_calls,
        judge_models=judge_models,
        external=external,
    )
    info = {
        "method": label,
        "checkpoint": _checkpoint_name(target),
        "found_by": target.found_by,
        "train_run_id": target.train_run_id,
        "train_run_name": target.train_run_name,
        "n": len(samples),
        "generations_dir": str(gen.directory),
        "generated_now": gen.generated,
        "reused": gen.reused,
        "judge": {"enabled": judge_ok, "skipped_reason": judge_reason, "calls": judge_calls,
                  "model_configured": (judge_cfg.get("client") or {}).get("model"), "model_reported": judge_models},
        "skipped": skipped,
        "headline": headline,
    }
    if external is not None:
        info["external_images"] = external.summary()
    if tracking_uri:
        outcome.eval_run_id = log_to_mlflow(c, outcome, tracking_uri)
        info["eval_run_id"] = outcome.eval_run_id
    files["run_info"] = out_dir / "run_info.json"
    files["run_info"].write_text(json.dumps(_jsonable(info), indent=2), encoding="utf-8")
    return outcome


# --------------------------------------------------------------------------- MLflow


def _eval_params(c: Mapping[str, Any], outcome: EvalOutcome) -> dict[str, Any]:
    from cag.utils.config import flatten_config

    judge_client = ((c.get("evaluation") or {}).get("judge") or {}).get("client") or {}
    base_url = judge_client.get("base_url")
    params = {
        "checkpoint": _checkpoint_name(outcome.target),
        "n": outcome.rows[0].coverage.get("pf", (0, len(outcome.generation.records)))[1],
        "seed": c.get("seed"),
        "sampler": c.get("sampler"),
        "data": {k: v for k, v in (c.get("data") or {}).items() if k != "num_samples"},
        "attention_override": c.get("attention"),
        "ref_positions_override": c.get("ref_positions"),
        "judge": {
            "enabled": "skipped" if "pf" in outcome.skipped else "yes",
            "model": judge_client.get("model"),
            "mode": ((c.get("evaluation") or {}).get("judge") or {}).get("mode", "online"),
            # host only: a URL may carry credentials in its user-info part
            "host": urlparse(str(base_url)).hostname if base_url else "api.openai.com",
        },
        "model_attention": outcome.generation.model_info.get("attention"),
        "model_trained_vae_dropout": outcome.generation.model_info.get("trained_vae_dropout"),
        "global_step": outcome.generation.model_info.get("global_step"),
    }
    if outcome.target.external:
        # nothing was sampled here: sampler and model settings would describe a model that did not run
        for key in ("sampler", "seed", "attention_override", "ref_positions_override", "model_attention",
                    "model_trained_vae_dropout", "global_step"):
            params.pop(key, None)
        params["images"] = str(outcome.target.images_dir)
        params["image_size_rule"] = outcome.external.summary()["size_rule"] if outcome.external else None
    return {k: ("None" if v is None else str(v))[:500] for k, v in flatten_config(params).items()}


def log_to_mlflow(c: Mapping[str, Any], outcome: EvalOutcome, tracking_uri: str) -> str:
    """One run in the evaluation experiment, tagged with the training run; headline metrics also on that run."""
    from mlflow.entities import Metric, Param, RunTag

    from cag.tracking import mark_model_training_experiment

    client = _mlflow_client(tracking_uri)
    ml = c.get("mlflow") or {}
    name = str(ml.get("experiment_name", "cag-eval"))
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(
        name, artifact_location=ml.get("artifact_location") or None
    )
    mark_model_training_experiment(client, exp_id)  # so mlflow ui opens the runs table, as for training
    target = outcome.target
    prefix = str(ml.get("metric_prefix", "eval"))
    tags = {
        "mlflow.runName": f"{prefix}:{outcome.rows[0].method}",
        "train_run_id": target.train_run_id or "",
        "train_run_name": target.train_run_name or "",
        "checkpoint": _checkpoint_name(target),
        "checkpoint_found_by": target.found_by,
        "method": outcome.rows[0].method,
        "source": EXTERNAL if target.external else "checkpoint",
        "metric_prefix": prefix,
        "output_dir": str(outcome.output_dir),
        "generations_dir": str(outcome.generation.directory),
        "judge/model_reported": ",".join(outcome.judge_models) or "none",
    }
    for key, reason in outcome.skipped.items():
        tags[f"skipped/{METRIC_NAMES.get(key, key)}"] = reason[:4900]
    ext = outcome.external
    if ext is not None:
        tags["images_dir"] = str(ext.folder)
        tags["images/size_rule"] = ext.summary()["size_rule"]
        if ext.missing:
            tags["images/missing"] = ",".join(ext.missing)[:4900]
        if ext.unreadable:
            tags["images/unreadable"] = ",".join(ext.unreadable)[:4900]
    run = client.create_run(exp_id, tags=tags)
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in outcome.headline.items()]
    if ext is not None:
        metrics += [
            Metric("images_scored", float(len(ext.paths)), now, 0),
            Metric("images_missing", float(len(ext.missing)), now, 0),
            Metric("images_unreadable", float(len(ext.unreadable)), now, 0),
            Metric("images_resized", float(len(ext.resized)), now, 0),
        ]
    metrics += [
        Metric("judge_calls", float(outcome.judge_calls), now, 0),
        Metric("generated_now", float(outcome.generation.generated), now, 0),
    ]
    params = [Param(k, v) for k, v in _eval_params(c, outcome).items()]
    client.log_batch(run_id, metrics=metrics, params=params, tags=[])
    if ml.get("log_artifacts", True):
        for key in ("results", "summary_md", "summary_csv", "summary_json", "html", "grid", "judge"):
            path = outcome.files.get(key)
            if path is not None and Path(path).is_file():
                client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")
    if target.train_run_id:
        client.log_batch(
            target.train_run_id,
            metrics=[Metric(f"{prefix}/{k}", v, now, 0) for k, v in outcome.headline.items()],
            tags=[RunTag(f"{prefix}/run_id", run_id), RunTag(f"{prefix}/judge_model", tags["judge/model_reported"])],
        )
    return run_id


# --------------------------------------------------------------------------- printing


def format_report(outcome: EvalOutcome) -> str:
    """What ``evaluation/run.py`` prints: the table, what was skipped and why, where everything went."""
    lines = [format_markdown_table(outcome.rows).rstrip()]
    gen = outcome.generation
    ext = outcome.external
    if ext is not None:
        lines.append(
            f"\nimages of {outcome.rows[0].method!r} from {ext.folder}: {len(ext.paths)} scored "
            f"({len(ext.resized)} resized: {ext.summary()['size_rule']}), {len(ext.missing)} missing, "
            f"{len(ext.unreadable)} unreadable"
        )
        for key in ext.missing[:10]:
            lines.append(f"  missing: {key}")
        for key, why in list(ext.unreadable.items())[:10]:
            lines.append(f"  unreadable: {key} ({why})")
        if len(ext.missing) + len(ext.unreadable) > 20:
            lines.append("  ... all of them in run_info.json")
        if ext.extra:
            lines.append(f"  {len(ext.extra)} files match no sample key, e.g. {ext.extra[0]}")
    else:
        lines.append(
            f"\nimages: {gen.generated} generated now, {gen.reused} reused, in {gen.directory}"
        )
    if outcome.judge_models:
        lines.append(f"judge: {outcome.judge_calls} calls; model reported by the API: {', '.join(outcome.judge_models)}")
    if outcome.skipped:
        lines.append("skipped metrics:")
        for key, reason in outcome.skipped.items():
            lines.append(f"  {METRIC_NAMES.get(key, key)}: {reason}")
    else:
        lines.append("skipped metrics: none")
    lines.append(f"outputs: {outcome.output_dir}")
    for key, path in outcome.files.items():
        lines.append(f"  {key}: {path}")
    if outcome.eval_run_id:
        run = outcome.target.train_run_id
        lines.append(f"MLflow: evaluation run {outcome.eval_run_id}" + (f", metrics written onto training run {run}" if run else ""))
    return "\n".join(lines)
