"""MLLM judge for Prompt Following (PF) and Subject Consistency (SC), 0-10 each.

One call per criterion and sample, as in the paper (Sec. 4.2) and docs/design.md, 'Judge metrics', online or
through the Batch API (:class:`cag.remote.batch.BatchChatClient`, half the price) with the
same prompts, validation and cache. Unlike the
peers' scripts, a sample whose answer cannot be parsed after the retry budget is recorded
as failed with its reason: its score is ``None``, never a random or zero stand-in, and
``evaluation.aggregate.summarize`` reports the coverage.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from cag.remote.answers import iter_structures
from cag.remote.batch import BatchChatClient
from cag.remote.chat import ChatClient, ChatRequest, ChatResult, image_to_data_url
from evaluation import prompts
from evaluation.aggregate import overall_per_sample

SCORE_MIN = 0.0
SCORE_MAX = 10.0
KEY_SEP = "::"


@dataclass(frozen=True)
class JudgeAnswer:
    score: float
    reasoning: str


@dataclass
class JudgeItem:
    """One generated image to judge. ``scene_ref`` (1-based Fig. number) tells the SC rubric
    which reference is the scene, when the benchmark records it."""

    key: str
    instruction: str
    references: list[Image.Image | Path]
    generated: Image.Image | Path
    task_type: str = "default"
    scene_ref: int | None = None


@dataclass
class JudgeRecord:
    """Judgement of one sample; per-criterion dicts are keyed by "PF" / "SC"."""

    key: str
    task_type: str
    pf: float | None = None
    sc: float | None = None
    status: dict[str, str] = field(default_factory=dict)
    reasoning: dict[str, str | None] = field(default_factory=dict)
    error: dict[str, str | None] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    cached: dict[str, bool] = field(default_factory=dict)
    model_reported: dict[str, str | None] = field(default_factory=dict)
    raw: dict[str, list[str]] = field(default_factory=dict)
    prompt_version: str = prompts.PROMPT_VERSION

    def score(self, criterion: str) -> float | None:
        return {"PF": self.pf, "SC": self.sc}[criterion]

    def scores(self) -> dict[str, float | None]:
        """Scores keyed as ``evaluation.report`` expects; Overall only when both criteria scored."""
        overall = None if self.pf is None or self.sc is None else overall_per_sample(self.pf, self.sc)
        return {"pf": self.pf, "sc": self.sc, "overall": overall}

    def details(self) -> dict[str, Any]:
        """What explains the scores in a report (no raw answers, which can be long)."""
        return {
            "judge_status": dict(self.status),
            "judge_reasoning": dict(self.reasoning),
            "judge_error": {k: v for k, v in self.error.items() if v},
            "judge_attempts": dict(self.attempts),
            "judge_model": dict(self.model_reported),
            "judge_prompt": self.prompt_version,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- parsing
def _dicts(value: Any) -> list[dict[str, Any]]:
    """The object itself, or the objects of a list: some models wrap a single answer in ``[...]``."""
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list | tuple):
        return [d for v in value for d in _dicts(v)]
    return []


def _as_score(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("score is a boolean, not a number")
    if isinstance(value, int | float):
        score = float(value)
    elif isinstance(value, str):
        try:
            score = float(value.strip())
        except ValueError:
            raise ValueError(f"score {value!r} is not a number") from None
    else:
        raise ValueError(f"score has type {type(value).__name__}, not a number")
    if not math.isfinite(score) or not SCORE_MIN <= score <= SCORE_MAX:
        raise ValueError(f"score {value!r} is outside [{SCORE_MIN:g}, {SCORE_MAX:g}]")
    return score


def parse_score(text: str) -> JudgeAnswer:
    """Validator for the chat client: raises ValueError (so the call is retried) unless the
    answer holds exactly one score in [0, 10]; two different scores are ambiguous."""
    candidates = [obj for value in iter_structures(text) for obj in _dicts(value) if "score" in obj]
    if not candidates:
        raise ValueError("no JSON object with a 'score' field")
    scores = {_as_score(obj["score"]) for obj in candidates}
    if len(scores) > 1:
        raise ValueError(f"answer gives several different scores {sorted(scores)}")
    chosen = candidates[-1]
    reasoning = chosen.get("reasoning", "")
    return JudgeAnswer(
        score=scores.pop(), reasoning=reasoning if isinstance(reasoning, str) else json.dumps(reasoning)
    )


# --------------------------------------------------------------------------- requests
def build_messages(item: JudgeItem, criterion: str, urls: dict[str, Any] | None = None) -> list[dict]:
    """Chat messages for one criterion: rubric as system prompt; then the instruction, the
    references as "Fig. k", and the generated image last, in the order docs/design.md, 'Judge metrics' fixes.
    ``urls`` lets both criteria share one encoding of each image."""
    if urls is None:
        urls = encode_images(item)
    content: list[dict[str, Any]] = [
        {"type": "text", "text": f"{prompts.INSTRUCTION_LABEL} {item.instruction}"}
    ]
    for k, url in enumerate(urls["references"], start=1):
        content.append({"type": "text", "text": prompts.REFERENCE_LABEL.format(k=k)})
        content.append({"type": "image_url", "image_url": {"url": url}})
    content.append({"type": "text", "text": prompts.GENERATED_LABEL})
    content.append({"type": "image_url", "image_url": {"url": urls["generated"]}})
    return [
        {"role": "system", "content": prompts.system_prompt(criterion, item.scene_ref)},
        {"role": "user", "content": content},
    ]


def encode_images(item: JudgeItem, memo: dict[Any, str] | None = None) -> dict[str, Any]:
    """Data URLs of the item's images; ``memo`` reuses the encoding of a reference image that
    several samples share (the same subject photo across a benchmark)."""
    memo = {} if memo is None else memo

    def url(image: Image.Image | Path) -> str:
        # id() is stable here: the caller keeps every item of the chunk alive meanwhile.
        token = ("path", str(image)) if isinstance(image, str | Path) else ("obj", id(image))
        if token not in memo:
            memo[token] = image_to_data_url(image)
        return memo[token]

    return {"references": [url(r) for r in item.references], "generated": url(item.generated)}


def request_key(item_key: str, criterion: str) -> str:
    return f"{item_key}{KEY_SEP}{criterion}"


def _fill(record: JudgeRecord, criterion: str, res: ChatResult[JudgeAnswer]) -> None:
    record.status[criterion] = res.status
    record.error[criterion] = res.error
    record.attempts[criterion] = res.attempts
    record.cached[criterion] = res.cached
    record.model_reported[criterion] = res.model_reported
    record.raw[criterion] = list(res.raw)
    answer = res.value if res.status == "ok" else None
    record.reasoning[criterion] = answer.reasoning if answer is not None else None
    score = answer.score if answer is not None else None
    if criterion == "PF":
        record.pf = score
    else:
        record.sc = score


def judge_items(
    items: Sequence[JudgeItem],
    client: ChatClient,
    criteria: Sequence[str] = prompts.CRITERIA,
    on_result: Callable[[JudgeRecord], None] | None = None,
    max_tokens: int = 512,
    chunk_size: int = 64,
    progress: bool = False,
) -> list[JudgeRecord]:
    """Judge ``items`` on ``criteria``; ``on_result`` receives each sample's record as soon as
    all its criteria are settled, so a caller can append it to a JSONL file (a resumed run
    then costs nothing for finished samples thanks to the client's cache).

    Items go to the client ``chunk_size`` at a time because inlined 1 MP references weigh
    megabytes each; encoding the whole test set up front would hold gigabytes.
    """
    unknown = [c for c in criteria if c not in prompts.CRITERIA]
    if unknown or not criteria:
        raise ValueError(f"criteria must be a non-empty subset of {prompts.CRITERIA}, got {list(criteria)}")
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        raise ValueError("JudgeItem keys must be unique")
    records: dict[str, JudgeRecord] = {}
    pending: dict[str, int] = {}
    out: list[JudgeRecord] = []

    def settle(res: ChatResult[JudgeAnswer]) -> None:
        item_key, criterion = res.key.rsplit(KEY_SEP, 1)
        _fill(records[item_key], criterion, res)
        pending[item_key] -= 1
        if pending[item_key] == 0 and on_result is not None:
            on_result(records[item_key])

    def chunk_requests(chunk: Sequence[JudgeItem]) -> list[ChatRequest]:
        requests: list[ChatRequest] = []
        memo: dict[Any, str] = {}
        for item in chunk:
            records[item.key] = JudgeRecord(key=item.key, task_type=item.task_type)
            pending[item.key] = len(criteria)
            urls = encode_images(item, memo)
            for criterion in criteria:
                requests.append(
                    ChatRequest(
                        request_key(item.key, criterion), build_messages(item, criterion, urls), max_tokens
                    )
                )
        return requests

    step = max(1, chunk_size)
    if isinstance(client, BatchChatClient):
        # one set of batches for the whole run (a batch per chunk would wait for each in turn);
        # the chunks only bound how many encoded images are in memory while the input file is written
        with client.session(parse_score, on_result=settle, progress=progress) as session:
            for start in range(0, len(items), step):
                session.add(chunk_requests(items[start : start + step]))
        return [records[item.key] for item in items]
    for start in range(0, len(items), step):
        chunk = items[start : start + step]
        client.run(chunk_requests(chunk), parse_score, on_result=settle, progress=progress)
        out.extend(records[item.key] for item in chunk)
    return out


def write_jsonl(records: Sequence[JudgeRecord], path: str | Path) -> None:
    """Judgements as one JSON object per line, the input format of ``aggregate.summarize``."""
    with Path(path).open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec.to_dict(), ensure_ascii=False) + "\n")
