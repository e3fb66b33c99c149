"""Two-stage instruction-reference alignment over a stream of samples, resumable.

Grounding a training set means thousands of paid VLM calls; a run that dies at 80 %
must not pay again for the first 80 %. Each sample's outcome is appended to a JSONL file
the moment it is known, keyed by (sample key, prompt-template hash, model, coordinate
convention); a rerun skips every key already there. A sample that could not be grounded
is written too, with its reasons, so "missing" never means "silently dropped".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from cag.data.sample import Grounding, Sample

from .backends import STAGE_BOXES, STAGE_PHRASES, Answer, GroundingBackend, GroundingRequest
from .parse import parse_box_list, parse_phrase_list
from .prompts import PromptTemplates
from .validate import Rejection, check_boxes, check_phrases, failure_rejection

log = logging.getLogger(__name__)

RESULTS_FORMAT = 1


@dataclass
class SampleResult:
    """Everything the alignment produced for one sample, as stored in the results JSONL."""

    key: str
    cache_key: str
    num_references: int
    phrases: list[str] = field(default_factory=list)
    groundings: list[Grounding] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    merged: int = 0
    calls: int = 0
    raw: dict[str, str | None] = field(default_factory=dict)
    model: str = ""
    coords: str = ""
    template_hash: str = ""

    @property
    def failed(self) -> bool:
        """A request ended without a usable answer (as opposed to items being rejected)."""
        return any(r.stage == "request" for r in self.rejections)

    @property
    def status(self) -> str:
        """``full``: every listed phrase located, nothing rejected; ``partial``: some groundings; ``none``."""
        if not self.groundings:
            return "none"
        return "partial" if self.rejections else "full"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RESULTS_FORMAT,
            "key": self.key,
            "cache_key": self.cache_key,
            "status": self.status,
            "failed": self.failed,
            "num_references": self.num_references,
            "phrases": self.phrases,
            "groundings": [g.to_json() for g in self.groundings],
            "rejections": [r.to_json() for r in self.rejections],
            "merged": self.merged,
            "calls": self.calls,
            "raw": self.raw,
            "model": self.model,
            "coords": self.coords,
            "template_hash": self.template_hash,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> SampleResult:
        return cls(
            key=obj["key"],
            cache_key=obj["cache_key"],
            num_references=int(obj["num_references"]),
            phrases=list(obj.get("phrases", [])),
            groundings=[Grounding.from_json(g) for g in obj.get("groundings", [])],
            rejections=[Rejection.from_json(r) for r in obj.get("rejections", [])],
            merged=int(obj.get("merged", 0)),
            calls=int(obj.get("calls", 0)),
            raw=dict(obj.get("raw", {})),
            model=obj.get("model", ""),
            coords=obj.get("coords", ""),
            template_hash=obj.get("template_hash", ""),
        )


class ResultStore:
    """Append-only JSONL of :class:`SampleResult`; tolerant of a last line cut by a crash."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def load(self) -> dict[str, SampleResult]:
        """Stored results by cache key; a torn final line (killed mid-write) is cut off so appends stay valid."""
        if not self.path.is_file():
            return {}
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            log.warning("results file %s ends in a partial line; dropping it", self.path)
            with self.path.open("r+b") as fh:
                fh.truncate(cut)
            data = data[:cut]
        out: dict[str, SampleResult] = {}
        for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                res = SampleResult.from_json(json.loads(line))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("%s:%d: unreadable result line ignored (%s)", self.path, lineno, exc)
                continue
            out[res.cache_key] = res  # a later line for the same key (a retried failure) wins
        return out

    def append(self, result: SampleResult) -> None:
        line = json.dumps(result.to_json(), ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())


class GroundingPipeline:
    """Runs stage 1 then stage 2 chunk by chunk, writing each sample's result as soon as it settles.

    ``chunk_size`` bounds both memory (images of the chunk) and what an interruption can
    lose: at most the unfinished samples of one chunk are asked again.
    """

    def __init__(
        self,
        backend: GroundingBackend,
        templates: PromptTemplates,
        results_path: str | Path | None = None,
        chunk_size: int = 64,
        retry_failed: bool = False,
    ) -> None:
        self.backend = backend
        self.templates = templates
        self.store = ResultStore(results_path) if results_path is not None else None
        self.chunk_size = max(1, int(chunk_size))
        self.retry_failed = retry_failed
        self.skipped = 0

    def cache_key(self, sample: Sample) -> str:
        """Identity of an answer: same sample, same prompts, same model and box convention."""
        ident = json.dumps(
            [sample.key, self.templates.digest, self.backend.model_id, self.backend.coords],
            ensure_ascii=False,
        )
        return hashlib.sha256(ident.encode("utf-8")).hexdigest()[:32]

    def run(
        self, samples: Iterable[Sample], on_result: Callable[[SampleResult], None] | None = None
    ) -> dict[str, SampleResult]:
        """Results by sample key, earlier runs' included; ``on_result`` sees only new results."""
        done = self.store.load() if self.store is not None else {}
        results: dict[str, SampleResult] = {}
        self.skipped = 0
        it = iter(samples)
        while True:
            chunk = list(islice(it, self.chunk_size))
            if not chunk:
                break
            todo = []
            for s in chunk:
                if s.key in results or any(t.key == s.key for t in todo):
                    # Results are keyed by sample key; a repeated key would be asked twice
                    # and stored twice, and the shard writer refuses it anyway.
                    log.warning(
                        "sample key %r occurs more than once in the input; later copies ignored", s.key
                    )
                    continue
                prev = done.get(self.cache_key(s))
                if prev is not None and not (self.retry_failed and prev.failed):
                    results[s.key] = prev
                    self.skipped += 1
                else:
                    todo.append(s)
            for res in self._ground_chunk(todo):
                results[res.key] = res
                if on_result is not None:
                    on_result(res)
        return results

    def _new_result(self, sample: Sample) -> SampleResult:
        return SampleResult(
            key=sample.key,
            cache_key=self.cache_key(sample),
            num_references=len(sample.references),
            model=self.backend.model_id,
            coords=self.backend.coords,
            template_hash=self.templates.digest,
        )

    def _ground_chunk(self, samples: list[Sample]) -> Iterator[SampleResult]:
        finished: list[SampleResult] = []

        def finish(res: SampleResult) -> None:
            if self.store is not None:
                self.store.append(res)
            finished.append(res)

        by_key: dict[str, tuple[Sample, SampleResult]] = {}
        stage1: list[GroundingRequest] = []
        for s in samples:
            res = self._new_result(s)
            if not s.references:
                res.rejections.append(Rejection("request", "no_references", "sample has no reference images"))
                finish(res)
                continue
            req_key = f"{s.key}#{STAGE_PHRASES}"
            by_key[req_key] = (s, res)
            stage1.append(
                GroundingRequest(
                    req_key, STAGE_PHRASES, self.templates.render_phrases(s.instruction), s.references, s
                )
            )

        stage2: list[GroundingRequest] = []

        def after_phrases(ans: Answer[list[Any]]) -> None:
            s, res = by_key[ans.key]
            res.calls += ans.attempts
            res.raw[STAGE_PHRASES] = ans.raw
            if ans.status != "ok" or ans.value is None:
                res.rejections.append(failure_rejection(ans.status, ans.raw, ans.error, parse_phrase_list))
                finish(res)
                return
            check = check_phrases(ans.value, s.instruction)
            res.phrases = check.phrases
            res.rejections.extend(check.rejections)
            if not check.phrases:
                res.rejections.append(Rejection("phrases", "no_phrases", "the model listed no usable phrase"))
                finish(res)
                return
            req_key = f"{s.key}#{STAGE_BOXES}"
            by_key[req_key] = (s, res)
            text = self.templates.render_boxes(check.phrases)
            stage2.append(GroundingRequest(req_key, STAGE_BOXES, text, s.references, s, check.phrases))

        if stage1:
            self.backend.answer(stage1, parse_phrase_list, on_answer=after_phrases)

        def after_boxes(ans: Answer[list[Any]]) -> None:
            s, res = by_key[ans.key]
            res.calls += ans.attempts
            res.raw[STAGE_BOXES] = ans.raw
            if ans.status != "ok" or ans.value is None:
                res.rejections.append(failure_rejection(ans.status, ans.raw, ans.error, parse_box_list))
                finish(res)
                return
            sizes = (
                self.backend.model_image_sizes(s.references) if self.backend.coords == "absolute" else None
            )
            check = check_boxes(
                ans.value, s.instruction, len(s.references), self.backend.coords, sizes, res.phrases
            )
            res.groundings = check.groundings
            res.rejections.extend(check.rejections)
            res.merged = check.merged
            finish(res)

        if stage2:
            self.backend.answer(stage2, parse_box_list, on_answer=after_boxes)
        # Input order, not completion order, so outputs are reproducible run to run.
        order = {s.key: i for i, s in enumerate(samples)}
        yield from sorted(finished, key=lambda r: order.get(r.key, -1))


def apply_groundings(sample: Sample, result: SampleResult | None) -> Sample:
    """The sample with the alignment's groundings (none when it was not grounded)."""
    sample.groundings = list(result.groundings) if result is not None else []
    return sample
