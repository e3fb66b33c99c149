"""Per-sample scores: the MLLM judge (PF / SC), DINO / CLIP-I / CLIP-T, and the judge-free proxies.

A metric that cannot run here is skipped with its reason (judge not configured, embedding
weights not on disk, no ground truth for the proxies); a skipped metric is "—" in the
tables, never 0. The judge's answers are cached on disk by the chat client, so a rerun
costs no calls.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from PIL import Image

from cag.data.sample import Sample
from evaluation.external import ExternalImages
from evaluation.proxies import (
    BINDING_OUTCOMES,
    PART_METRIC_NAMES,
    TruthError,
    binding_details,
    binding_rates,
    prompt_following_details,
    proxy_parts,
    scores_from_details,
    subject_consistency_details,
)
from evaluation.report import RunSummary, SampleResult, summarise
from evaluation.target import EvaluationError

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
    # local: the judge's client modules load the openai library, a slow import that runs without a judge skip
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
        images = [open_rgb(generated[s.key]) for s in chunk]
        refs = [list(s.references) for s in chunk]
        prompts = [s.instruction for s in chunk]
        for name, metric in metrics.items():
            metric.update(images, refs, prompts)
            for s, v in zip(chunk, metric.last_values, strict=True):
                out[s.key][name] = float(v)
    return out


def open_rgb(path: str | Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def proxy_sample_scores(sample: Sample, image: Image.Image) -> tuple[dict[str, float | None], dict[str, Any]]:
    """Judge-free PF / SC / Overall of one synthetic sample, or the error that prevented it."""
    try:
        if sample.truth is None:
            raise TruthError(f"sample {sample.key!r} has no truth")
        pf_details = prompt_following_details(image, sample.truth)
        sc_details = subject_consistency_details(image, sample.references, sample.truth)
        scores = scores_from_details(pf_details, sc_details)
        details = {
            "pf_per_entity": pf_details,
            "sc_per_subject": sc_details,
            "parts": proxy_parts(pf_details, sc_details, sample.truth),
            "binding": binding_details(image, sample.truth),
        }
    except Exception as exc:  # TruthError and friends: recorded per sample, never turned into a score
        return {k: None for k in PROXY_KEYS}, {"proxy_error": f"{type(exc).__name__}: {exc}"}
    return {"proxy_pf": scores["pf"], "proxy_sc": scores["sc"], "proxy_overall": scores["overall"]}, details


@dataclass
class SampleScores:
    """Every sample's scores and details, which metrics were skipped and why, and what the judge cost."""

    results: list[SampleResult]
    skipped: dict[str, str]
    proxies_ran: bool
    judge_ran: bool
    judge_skipped_reason: str | None = None
    judge_calls: int = 0
    judge_models: list[str] = field(default_factory=list)


def score_samples(
    c: Mapping[str, Any],
    samples: Sequence[Sample],
    generated: Mapping[str, str],
    references: Mapping[str, list[str]],
    targets: Mapping[str, str],
    records: Mapping[str, Mapping[str, Any]],
    external: ExternalImages | None,
    out_dir: Path,
) -> SampleScores:
    """Judge, embedding metrics and proxies over the samples that have an image; the others are listed, unscored.

    ``c`` is the evaluation config (``evaluation.judge``, ``metrics``, ``proxies``, ``progress``);
    ``records`` are the generation records (their seed goes into each sample's details).
    """
    skipped: dict[str, str] = {}
    # samples without a usable image are named and counted, never scored
    scorable = [s for s in samples if s.key in generated]

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
        # local: torchvision and torchmetrics are a slow import that metrics.enabled=false runs skip
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
        record = records.get(s.key) or {}
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
            proxy, proxy_details = proxy_sample_scores(s, open_rgb(generated[s.key]))
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

    return SampleScores(results, skipped, run_proxies, judge_ok, judge_reason, judge_calls, judge_models)


def summary_rows(
    label: str, results: Sequence[SampleResult], skipped: Mapping[str, str], proxies_ran: bool
) -> tuple[list[RunSummary], dict[str, float]]:
    """The table rows (the run, and its judge-free proxy row when proxies ran) and the headline metrics.

    Every skip (proxies included) goes into the main row, so ``summary.json`` names them all
    with their reasons; the headline is what MLflow and the printed report show.
    """
    main_row = summarise(label, list(results), skipped=dict(skipped))
    rows = [main_row]
    proxy_row = None
    if proxies_ran:
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
    if proxy_row is not None:
        headline.update(proxy_breakdown(results))
    for k in JUDGE_KEYS:
        valid, total = main_row.coverage.get(k, (0, len(results)))
        if k not in skipped:
            headline[f"coverage_{METRIC_NAMES[k]}"] = valid / total if total else 0.0
    return rows, headline


def proxy_breakdown(results: Sequence[SampleResult]) -> dict[str, float]:
    """Where the proxies come from, over the run: the mean of each part, and the binding rates.

    Parts average the samples that have that part; binding pools every subject of the samples
    with two or more (``evaluation.proxies.binding_details``). Absent ones are left out.
    """
    proxies = [(r.details or {}).get("proxy") or {} for r in results]
    proxies = [p for p in proxies if "parts" in p]
    out: dict[str, float] = {}
    for part, name in PART_METRIC_NAMES.items():
        values = [p["parts"][part] for p in proxies if p["parts"].get(part) is not None]
        if values:
            out[name] = 10.0 * sum(values) / len(values)
    rates = binding_rates([p.get("binding") or {} for p in proxies])
    for outcome in BINDING_OUTCOMES:
        if rates[outcome] is not None:
            out[f"proxy_{outcome}"] = float(rates[outcome])  # type: ignore[arg-type]
    return out
