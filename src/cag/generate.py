"""Inference: load a model (trained checkpoint, real weights, or untrained), generate images, record how.

Two choices here matter for anyone comparing images across runs:

* Every image gets its own seed (``seed + index``) and its own noise, drawn on the CPU
  from a generator seeded with that seed. An image therefore depends on its seed, its
  sample and the settings only, never on which samples shared its batch or on the
  device, so a single bad image can be regenerated alone. :func:`cag.sampling.sample`
  draws one noise tensor for the whole batch, which ties an image to its batch-mates;
  :func:`cag.sampling.sample_batch` is the same Euler + true-CFG loop with per-image noise
  (a test keeps the two equal for a batch of one).
* Every image's line in ``generations.jsonl`` carries all settings that produced it
  (sampler, attention, reference positions, sizes, checkpoint), so an evaluation or a
  figure never has to guess what it is looking at.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sized
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cag.checkpoints import read_checkpoint, resolve_checkpoint, weights_seed
from cag.data.batching import bucket_batches, collate, to_image
from cag.data.sample import Sample
from cag.data.sources import SampleSource
from cag.lightning_module import TRAINABLE_PREFIX, CheckpointMismatchError, model_architecture
from cag.models.attention import ATTENTION_MODES
from cag.models.cag_model import CAGModel, build_cag_model
from cag.models.positions import REF_POSITION_MODES
from cag.sampling import SamplerConfig, sample_batch, sampler_from_settings
from cag.utils.plain import plain

log = logging.getLogger(__name__)

GENERATIONS_FILE = "generations.jsonl"


# --------------------------------------------------------------------------- loading


def _check_mode(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")
    return value


def load_model_for_inference(
    checkpoint: str | Path | None,
    model_cfg: Any = None,
    attention: str | None = None,
    ref_positions: str | None = None,
    *,
    seed: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[CAGModel, dict[str, Any]]:
    """A model ready to sample, and the facts about it that every generated image should record.

    * ``checkpoint`` set: the model is rebuilt from the checkpoint's own model config (the
      frozen VLM and codec are not stored, so the config and seed that built them are the
      source of truth) and the trained DiT weights are loaded. A ``model_cfg`` whose
      architecture differs is refused (:class:`CheckpointMismatchError`) instead of
      silently using the checkpoint's.
    * ``checkpoint`` None, ``model_cfg.source`` set: released weights (e.g.
      Qwen-Image-Edit-2509) through :func:`build_cag_model`, the training code path.
    * ``checkpoint`` None, no source: a randomly initialised model, the "untrained"
      baseline; with the training seed it is exactly the model at step 0.

    ``attention`` / ``ref_positions`` override the checkpoint's (inference ablations);
    ``seed`` overrides the build seed (defaults: the checkpoint's, else 0).
    """
    hp: dict[str, Any] = {}
    state: Mapping[str, Any] | None = None
    info: dict[str, Any] = {"checkpoint": None, "global_step": None}
    if checkpoint is not None:
        ckpt = read_checkpoint(checkpoint)
        hp = dict(ckpt["hyper_parameters"])
        saved = dict(hp["model"])
        if model_cfg is not None:
            wanted = dict(plain(model_cfg))
            if model_architecture(wanted) != model_architecture(saved):
                raise CheckpointMismatchError(
                    f"{checkpoint}: checkpoint was trained with model config {saved.get('name')!r} {model_architecture(saved)}; "
                    f"model={wanted.get('name')!r} asks for {model_architecture(wanted)}"
                )
        cfg = saved
        # EMA weights are what a run is meant to be sampled with (see CAGLightningModule); raw ones otherwise
        ema = ckpt.get("ema_state_dict")
        state = ema if isinstance(ema, Mapping) and ema else ckpt["state_dict"]
        info["ema"] = state is ema
        info.update(checkpoint=str(Path(checkpoint).resolve()), global_step=ckpt.get("global_step"))
    elif model_cfg is not None:
        cfg = dict(plain(model_cfg))
    else:
        raise ValueError("load_model_for_inference needs a checkpoint path or a model config (model=tiny / model=...)")

    attention = _check_mode("attention", attention or hp.get("attention", "masked"), ATTENTION_MODES)
    ref_positions = _check_mode("ref_positions", ref_positions or hp.get("ref_positions", "offset"), REF_POSITION_MODES)
    build_seed = int(seed) if seed is not None else weights_seed(hp)
    model = build_cag_model(OmegaConf.create(cfg), attention=attention, ref_positions=ref_positions, seed=build_seed)
    if state is not None:
        _load_transformer_weights(model, state, str(checkpoint))
    model.requires_grad_(False).eval().to(device)
    info.update(
        model_name=cfg.get("name"),
        model_source=cfg.get("source"),
        weights="checkpoint" if state is not None else ("pretrained" if cfg.get("source") else "untrained"),
        attention=attention,
        ref_positions=ref_positions,
        build_seed=build_seed,
        image_size=cfg.get("image_size"),
        vlm_image_size=cfg.get("vlm_image_size"),
        trained_attention=hp.get("attention"),
        trained_vae_dropout=hp.get("vae_dropout"),
        model_config=cfg,
    )
    return model, info


def _load_transformer_weights(model: CAGModel, state: Mapping[str, Any], path: str) -> None:
    """Exactly the trainable DiT parameters must be present; anything else means another model."""
    weights = {k[len(TRAINABLE_PREFIX):]: v for k, v in state.items() if k.startswith(TRAINABLE_PREFIX)}
    expected = {n: p for n, p in model.transformer.named_parameters()}
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    foreign = sorted(k for k in state if not k.startswith(TRAINABLE_PREFIX))
    if missing or unexpected or foreign:
        raise CheckpointMismatchError(
            f"{path}: weights do not fit the model: missing {missing[:5]}, unexpected {(unexpected + foreign)[:5]}"
        )
    for name, tensor in weights.items():
        if not isinstance(tensor, torch.Tensor) or tensor.shape != expected[name].shape:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise CheckpointMismatchError(
                f"{path}: weight {name!r} has shape {shape}, the model expects {tuple(expected[name].shape)}"
            )
    model.transformer.load_state_dict(weights, strict=False)


class _Numbered:
    """A sample with its input position; exposes ``references`` so :func:`bucket_batches` can group it."""

    def __init__(self, index: int, sample: Sample) -> None:
        self.index, self.sample, self.references = index, sample, sample.references


def _indexed_batches(samples: Iterable[Sample], batch_size: int) -> Iterator[list[tuple[int, Sample]]]:
    """:func:`bucket_batches` (one reference count per batch), keeping each sample's input index for its seed."""
    numbered = (_Numbered(i, s) for i, s in enumerate(samples))
    for batch in bucket_batches(numbered, batch_size, drop_last=False):  # type: ignore[arg-type]
        yield [(n.index, n.sample) for n in batch]


def _check_key(key: str, seen: set[str]) -> None:
    if not key or "/" in key or "\\" in key or key in (".", ".."):
        raise ValueError(f"sample key {key!r} cannot be used as an image file name")
    if key in seen:
        raise ValueError(f"sample key {key!r} occurs twice; its image would overwrite the first one")
    seen.add(key)


def generate_samples(
    model: CAGModel,
    samples: Iterable[Sample],
    out_dir: str | Path,
    *,
    sampler: SamplerConfig,
    image_size: int,
    vlm_image_size: int,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = True,
    model_info: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Generate ``<out_dir>/<key>.png`` per sample and one ``generations.jsonl`` line each; return the lines.

    Image ``index`` (position in ``samples``) uses seed ``seed + index`` whatever the batch
    size. ``generations.jsonl`` is rewritten by each call and flushed after every batch,
    so an interrupted run still describes the images it wrote.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = dict(model_info or {})
    settings = {
        "num_steps": int(sampler.num_steps),
        "cfg_scale": float(sampler.cfg_scale),
        "negative_prompt": sampler.negative_prompt,
        "use_ref_latents": bool(sampler.use_ref_latents),
        "attention": model.attention,
        "ref_positions": model.ref_positions,
        "image_size": [int(image_size), int(image_size)],
        "vlm_image_size": int(vlm_image_size),
    }
    provenance = {
        "checkpoint": info.get("checkpoint"),
        "model_name": info.get("model_name"),
        "model_source": info.get("model_source"),
        "weights": info.get("weights"),
        "ema_weights": info.get("ema"),
        "global_step": info.get("global_step"),
        "model_seed": info.get("build_seed"),  # builds the frozen VLM (and an untrained DiT) of the tiny model
    }
    total = len(samples) if isinstance(samples, Sized) else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="generating", unit="img")
    was_training = model.training
    model.eval()
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    start = time.perf_counter()
    try:
        with (out / GENERATIONS_FILE).open("w", encoding="utf-8") as fh:
            for chunk in _indexed_batches(samples, batch_size):
                for _, s in chunk:
                    _check_key(s.key, seen)
                batch = collate([s for _, s in chunk], image_size, vlm_image_size)
                seeds = [seed + i for i, _ in chunk]
                images = sample_batch(model, batch, seeds, sampler, image_size, image_size)
                for (i, s), img, sd in zip(chunk, images, seeds, strict=True):
                    path = out / f"{s.key}.png"
                    to_image(img).save(path)
                    rec = {
                        "key": s.key,
                        "index": i,
                        "seed": sd,
                        "image": str(path),
                        "instruction": s.instruction,
                        "task_type": s.task_type,
                        "num_references": len(s.references),
                        **settings,
                        **provenance,
                    }
                    records.append(rec)
                    fh.write(json.dumps(rec) + "\n")
                fh.flush()
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - start
    if records:
        log.info("generated %d images in %.1f s (%.3f images/s) into %s", len(records), seconds,
                 len(records) / max(seconds, 1e-9), out)
    return records


# --------------------------------------------------------------------------- command line (src/generate.py)

SYNTHETIC_DEFAULT_N = 32
def samples_from_config(inp: Any) -> list[Sample]:
    """The samples to generate for: synthetic split, shards, or a manifest (checked as a whole first)."""
    n = inp.get("n")
    if n is not None and (isinstance(n, bool) or int(n) < 0):
        raise ValueError(f"input.n={n!r} must be a non-negative int or null")
    source = SampleSource.from_config(inp, prefix="input")
    if n is None and source.kind == "synthetic":
        n = SYNTHETIC_DEFAULT_N
    return list(source.samples(n))


def run_generate(
    cfg: DictConfig, *, model_explicit: bool = False, ckpt_explicit: bool = False, out_dir: str | Path | None = None
) -> list[dict[str, Any]]:
    """Compose the pieces for ``src/generate.py``; returns the ``generations.jsonl`` records.

    ``model_explicit``: the user named ``model=...`` on the command line. Without an
    explicit ``ckpt=...`` that means "this model's own weights" (real weights or an
    untrained tiny model); with one, the model config is checked against the checkpoint.
    """
    ckpt_value = None if model_explicit and not ckpt_explicit else cfg.get("ckpt")
    checkpoint = resolve_checkpoint(ckpt_value)
    if checkpoint is not None:
        log.info("checkpoint: %s", checkpoint)
    samples = samples_from_config(cfg.input)  # bad input fails before a model is built
    if not samples:
        raise ValueError(f"input.source={cfg.input.source}: no samples to generate for")
    model, info = load_model_for_inference(
        checkpoint,
        cfg.model if (checkpoint is None or model_explicit) else None,
        attention=cfg.get("attention"),
        ref_positions=cfg.get("ref_positions"),
        device=cfg.get("device", "cpu"),
    )
    image_size = int(cfg.get("image_size") or info["image_size"])
    vlm_image_size = int(cfg.get("vlm_image_size") or info["vlm_image_size"])
    sampler = sampler_from_settings(
        {k: cfg.get(k) for k in ("num_steps", "cfg_scale", "negative_prompt", "use_ref_latents")}, info["model_config"]
    )
    target = Path(out_dir or cfg.get("out_dir") or ".")
    start = time.perf_counter()
    records = generate_samples(
        model, samples, target, sampler=sampler, image_size=image_size, vlm_image_size=vlm_image_size,
        batch_size=int(cfg.batch_size), seed=int(cfg.seed), progress=bool(cfg.get("progress", True)), model_info=info,
    )
    seconds = time.perf_counter() - start
    print(f"{len(records)} images in {seconds:.1f} s ({len(records) / max(seconds, 1e-9):.3f} images/s) -> "
          f"{target / GENERATIONS_FILE}")
    return records
