"""Pull the list out of a VLM's free-text answer.

Whatever wrapping the answer has (fences, prose, Python literals, trailing commas) is
undone by :func:`cag.remote.answers.iter_structures`; this module picks the value of the
shape each stage asked for, and raises :class:`AnswerParseError` (a ``ValueError``)
otherwise, so the chat client treats an unparsable answer like a transient failure and
asks again.
"""

from __future__ import annotations

from typing import Any

from cag.remote.answers import iter_structures


class AnswerParseError(ValueError):
    """The answer holds no list/object of the expected shape."""


def parse_phrase_list(text: str) -> list[Any]:
    """Stage-1 answer -> the raw list (items are checked later, one by one, with reasons)."""
    for value in iter_structures(text):
        if isinstance(value, (list, tuple)) and (not value or any(isinstance(v, str) for v in value)):
            return list(value)
    raise AnswerParseError(f"no list of phrases found in the answer: {_preview(text)}")


def parse_box_list(text: str) -> list[Any]:
    """Stage-2 answer -> the raw list of box objects.

    Accepts a list of objects, an object wrapping such a list (``{"objects": [...]}``),
    or bare objects one after another (a common way of "forgetting" the brackets).
    """
    loose: list[dict[str, Any]] = []
    for value in iter_structures(text):
        if isinstance(value, (list, tuple)):
            if not value or any(isinstance(v, dict) for v in value):
                return list(value)
        elif isinstance(value, dict):
            inner = [v for v in value.values() if isinstance(v, list) and any(isinstance(x, dict) for x in v)]
            if inner and not _looks_like_box(value):
                return list(inner[0])
            if _looks_like_box(value):
                loose.append(value)
    if loose:
        return loose
    raise AnswerParseError(f"no JSON list of boxes found in the answer: {_preview(text)}")


def _looks_like_box(obj: dict[str, Any]) -> bool:
    return any(k in obj for k in ("bbox_2d", "bbox", "box"))


def _preview(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[:limit] + "...")
