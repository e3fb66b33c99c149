"""The structured data inside a model's free-text answer, for every caller that asks for JSON.

Models asked for "a list" or "JSON" answer with a bare value, a ```json fenced block, a
sentence around it, Python literals with single quotes, or trailing commas, even when told
not to. The grounding parser and the judge both read answers through :func:`iter_structures`,
so an answer one of them accepts is read the same way by the other.
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
_FAILED = object()


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


def _regions(text: str) -> list[str]:
    """Fenced blocks first (the model marked them as the answer), then the whole text."""
    fenced = [m.group(1) for m in _FENCE.finditer(text)]
    return [*fenced, text]


def iter_structures(text: str) -> Iterator[Any]:
    """Every outermost parsable ``[...]``/``{...}`` in reading order, fenced blocks first.

    For each opening bracket the longest parsable span wins, and scanning resumes after
    it, so a list of dicts is returned whole rather than as its inner bbox lists, and a
    brace in prose before the answer ("{the image}") is skipped.
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
