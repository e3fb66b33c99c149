"""Turn parsed VLM answers into :class:`Grounding` objects, or into rejections with reasons.

Nothing a model says reaches the training data unchecked: a phrase must occur in the
instruction verbatim (the attention mask locates it by characters), a box must name an
existing reference and cover a non-empty area after conversion to the stored 0-1000
convention. Every item that fails is kept as a :class:`Rejection` so the report can
say *why* a sample is only partly grounded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from cag.data.sample import BOX_SCALE, Grounding, validate_grounding

from .parse import AnswerParseError

CoordSystem = Literal["relative1000", "absolute", "normalized"]
COORD_SYSTEMS: tuple[str, ...] = ("relative1000", "absolute", "normalized")

_IMAGE_ID = re.compile(
    r"^\s*(?:(?:fig(?:ure)?|image|img|picture|pic|ref(?:erence)?)\s*\.?\s*#?\s*)?(\d+)(?:\.0*)?\s*$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Rejection:
    """One thing a model said that we did not use, and why (``reason`` is a stable code for counting)."""

    stage: str  # "phrases" | "boxes" | "request"
    reason: str
    detail: str
    item: Any = None

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "reason": self.reason,
            "detail": self.detail,
            "item": _jsonable(self.item),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Rejection:
        return cls(obj["stage"], obj["reason"], obj["detail"], obj.get("item"))


@dataclass
class PhraseCheck:
    """Stage-1 outcome: the usable phrases (model order, duplicates dropped) and the rest."""

    phrases: list[str] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)


@dataclass
class BoxCheck:
    """Stage-2 outcome: validated groundings, rejections, and how many exact duplicates were merged."""

    groundings: list[Grounding] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    merged: int = 0


def check_phrases(items: Sequence[Any], instruction: str) -> PhraseCheck:
    out = PhraseCheck()
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            out.rejections.append(
                Rejection("phrases", "not_a_string", f"phrase {item!r} is not a string", item)
            )
            continue
        phrase = item.strip()
        if not phrase:
            out.rejections.append(Rejection("phrases", "empty_phrase", "empty phrase", item))
            continue
        if phrase not in instruction:
            out.rejections.append(
                Rejection(
                    "phrases",
                    "phrase_not_in_instruction",
                    f"{phrase!r} does not occur verbatim in the instruction",
                    item,
                )
            )
            continue
        if phrase in seen:
            continue  # the same phrase twice asks the same question twice; not an error
        seen.add(phrase)
        out.phrases.append(phrase)
    return out


def parse_image_id(value: Any) -> int:
    """``2``, ``"2"``, ``2.0``, ``"Fig.2"``, ``"Fig. 2"``, ``"image 2"`` -> 2; anything else raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"image_id {value!r} is not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = _IMAGE_ID.match(value)
        if m:
            return int(m.group(1))
    raise ValueError(f"image_id {value!r} is not a reference number")


def to_relative1000(
    box: Sequence[Any], coords: CoordSystem, image_size: tuple[int, int] | None = None
) -> tuple[float, float, float, float]:
    """Convert a model box to the stored 0-1000 convention, clamped; raise ValueError when unusable.

    ``image_size`` is (width, height) of the reference *as the model saw it*: Qwen2.5-VL
    answers in absolute pixels of the processor-resized image, not of the original file,
    so dividing by the original size would shift every box on non-multiple-of-28 images.
    """
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(f"bbox {box!r} does not have four numbers")
    vals: list[float] = []
    for v in box:
        if isinstance(v, bool):
            raise ValueError(f"bbox {box!r} holds a non-number")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"bbox {box!r} holds a non-number") from None
        if not math.isfinite(f):
            raise ValueError(f"bbox {box!r} holds a non-finite number")
        vals.append(f)
    if coords == "relative1000":
        scaled = vals
    elif coords == "normalized":
        scaled = [v * BOX_SCALE for v in vals]
    elif coords == "absolute":
        if image_size is None:
            raise ValueError("absolute coordinates need the model-input size of the reference")
        w, h = image_size
        scaled = [round(v * BOX_SCALE / d, 3) for v, d in zip(vals, (w, h, w, h), strict=True)]
    else:
        raise ValueError(f"unknown coordinate system {coords!r}; expected one of {COORD_SYSTEMS}")
    x1, y1, x2, y2 = (min(max(v, 0.0), BOX_SCALE) for v in scaled)
    return (x1, y1, x2, y2)


def check_boxes(
    items: Sequence[Any],
    instruction: str,
    num_references: int,
    coords: CoordSystem = "relative1000",
    image_sizes: Sequence[tuple[int, int]] | None = None,
    phrases: Sequence[str] | None = None,
) -> BoxCheck:
    """Validate every stage-2 item; when ``phrases`` is given, report the ones left without a box."""
    out = BoxCheck()
    seen: set[tuple[str, int, tuple[float, ...]]] = set()
    for item in items:
        rej = _check_one_box(item, instruction, num_references, coords, image_sizes)
        if isinstance(rej, Rejection):
            out.rejections.append(rej)
            continue
        ident = (rej.phrase, rej.image_id, tuple(rej.bbox_2d))
        if ident in seen:
            out.merged += 1
            continue
        seen.add(ident)
        out.groundings.append(rej)
    if phrases is not None:
        located = {g.phrase for g in out.groundings}
        for p in phrases:
            if p not in located:
                out.rejections.append(Rejection("boxes", "phrase_not_located", f"no usable box for {p!r}", p))
    return out


def _check_one_box(
    item: Any,
    instruction: str,
    num_references: int,
    coords: CoordSystem,
    image_sizes: Sequence[tuple[int, int]] | None,
) -> Grounding | Rejection:
    if not isinstance(item, dict):
        return Rejection("boxes", "not_an_object", f"item {item!r} is not an object", item)
    label = item.get("label", item.get("phrase"))
    if not isinstance(label, str) or not label.strip():
        return Rejection("boxes", "missing_label", "item has no label", item)
    phrase = label.strip()
    if phrase not in instruction:
        return Rejection(
            "boxes",
            "label_not_in_instruction",
            f"{phrase!r} does not occur verbatim in the instruction",
            item,
        )
    if "image_id" not in item:
        return Rejection("boxes", "missing_image_id", f"{phrase!r}: no image_id", item)
    try:
        image_id = parse_image_id(item["image_id"])
    except ValueError as exc:
        return Rejection("boxes", "bad_image_id", f"{phrase!r}: {exc}", item)
    if not 1 <= image_id <= num_references:
        return Rejection(
            "boxes",
            "image_id_out_of_range",
            f"{phrase!r}: image_id {image_id} is outside 1..{num_references}",
            item,
        )
    box = item.get("bbox_2d", item.get("bbox"))
    if box is None:
        return Rejection("boxes", "missing_bbox", f"{phrase!r}: no bbox_2d", item)
    size = image_sizes[image_id - 1] if image_sizes is not None else None
    try:
        rel = to_relative1000(box, coords, size)
    except ValueError as exc:
        return Rejection("boxes", "bad_bbox", f"{phrase!r}: {exc}", item)
    x1, y1, x2, y2 = rel
    if x2 <= x1 or y2 <= y1:
        return Rejection(
            "boxes",
            "degenerate_bbox",
            f"{phrase!r}: box {list(rel)} has no area after clamping to 0..1000",
            item,
        )
    g = Grounding(phrase, image_id, rel)
    validate_grounding(g, num_references, instruction)  # same rule the data loader applies
    return g


def failure_rejection(
    status: str, raw: str | None, error: str | None, parse: Callable[[str], Any]
) -> Rejection:
    """Why a request ended without an accepted answer, as one counted reason."""
    if status == "refused":
        return Rejection("request", "refused", error or "the model refused to answer")
    if raw is not None:
        try:
            parse(raw)
        except AnswerParseError as exc:
            return Rejection("request", "unparsable_answer", str(exc))
        except ValueError as exc:
            return Rejection("request", "invalid_answer", str(exc))
    return Rejection("request", "request_failed", error or "no answer")


def _jsonable(item: Any) -> Any:
    if item is None or isinstance(item, (str, int, float, bool)):
        return item
    if isinstance(item, (list, tuple)):
        return [_jsonable(v) for v in item]
    if isinstance(item, dict):
        return {str(k): _jsonable(v) for k, v in item.items()}
    return repr(item)
