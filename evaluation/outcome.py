"""What one evaluation produced, and the report ``evaluation/run.py`` prints from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from evaluation.external import ExternalImages
from evaluation.generation import GenerationOutcome
from evaluation.report import RunSummary, format_markdown_table
from evaluation.scoring import METRIC_NAMES
from evaluation.target import EvalTarget


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
    metric_prefix: str | None = None  # where the headline went on the training run: <prefix>/PF, ...
    external: ExternalImages | None = None


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
        lines.append(f"MLflow: evaluation run {outcome.eval_run_id}"
                     + (f", metrics written onto training run {run} as {outcome.metric_prefix}/..." if run else ""))
    return "\n".join(lines)
