"""Pull the list out of a VLM's free-text answer.

Models asked for "a list" or "JSON" answer with a bare list, a ```json fenced block, a
sentence around the list, Python literals with single quotes, or trailing commas. We
accept all of those, and raise :class:`AnswerParseError` (a ``ValueError``) otherwise, so
the chat client treats an unparsable answer like a transient failure and asks again.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from typing import Any

_FENCE = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*\n?(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([\]}])")
_CLOSER = {"[": "]", "{": "}"}
# Garbage answers (a random model, a runaway generation) can hold hundreds of brackets;
# bounding the (start, end) pairs tried keeps a bad answer from costing seconds to reject.
_MAX_ATTEMPTS = 4000


class AnswerParseError(ValueError):
    """The answer holds no list/object of the expected shape."""


def _loads(snippet: str) -> Any:
    for attempt in (snippet, _TRAILING_COMMA.sub(r"\1", snippet)):
        try:
            return json.loads(attempt)
        except ValueError:
            pass
    try:
        # Python literals: single quotes, trailing commas, True/None.
        return ast.literal_eval(snippet)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return _FAILED


_FAILED = object()


def _regions(text: str) -> list[str]:
    """Fenced blocks first (the model marked them as the answer), then the whole text."""
    fenced = [m.group(1) for m in _FENCE.finditer(text)]
    return [*fenced, text]


def iter_structures(text: str) -> Iterator[Any]:
    """Every outermost parsable ``[...]``/``{...}`` in reading order, fenced blocks first.

    For each opening bracket the longest parsable span wins, and scanning resumes after
    it, so a list of dicts is returned whole rather than as its inner bbox lists.
    """
    attempts = 0
    for region in _regions(text):
        opens = [i for i, c in enumerate(region) if c in _CLOSER]
        i = 0
        while i < len(opens):
            start = opens[i]
            closer = _CLOSER[region[start]]
            ends = [j for j in range(len(region) - 1, start, -1) if region[j] == closer]
            found = None
            for end in ends:
                attempts += 1
                if attempts > _MAX_ATTEMPTS:
                    return
                value = _loads(region[start : end + 1])
                if value is not _FAILED:
                    found = (value, end)
                    break
            if found is None:
                i += 1
                continue
            yield found[0]
            i = next((k for k in range(i + 1, len(opens)) if opens[k] > found[1]), len(opens))


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
