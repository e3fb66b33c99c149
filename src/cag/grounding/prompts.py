"""The two alignment prompts (paper Figs. 7 and 8) as editable text templates.

The wording lives in ``conf/grounding/prompts/*.txt`` so a researcher can change it
without touching code; everything downstream (the resume cache in particular) keys on a
hash of the text actually sent, so editing a template can never silently reuse answers
produced by the old wording.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# The placeholders are the ones printed in the paper's figures, so the template files
# read exactly like Figs. 7 and 8.
INSTRUCTION_SLOT = "<Instruction>"
OBJECT_LIST_SLOT = "<object_list>"

PHRASES_TEMPLATE_FILE = "extract_phrases.txt"
BOXES_TEMPLATE_FILE = "locate_phrases.txt"


def default_template_dir() -> Path:
    """``conf/grounding/prompts`` of this checkout: the one place the paper's wording is kept."""
    return Path(__file__).resolve().parents[3] / "conf" / "grounding" / "prompts"


@dataclass(frozen=True)
class PromptTemplates:
    """Stage-1 (phrase extraction) and stage-2 (box localisation) prompt texts.

    The reference images are not part of the text: every backend sends them as image
    content parts placed before the text, one per reference, as the figures show.
    """

    phrases: str
    boxes: str

    def __post_init__(self) -> None:
        # A template without its slot would send the same text for every sample and the
        # model would answer about the paper's examples instead of our instruction.
        if INSTRUCTION_SLOT not in self.phrases:
            raise ValueError(f"phrase-extraction template lacks the {INSTRUCTION_SLOT} placeholder")
        if OBJECT_LIST_SLOT not in self.boxes:
            raise ValueError(f"box template lacks the {OBJECT_LIST_SLOT} placeholder")

    @classmethod
    def load(
        cls, phrases_path: str | Path | None = None, boxes_path: str | Path | None = None
    ) -> PromptTemplates:
        base = default_template_dir()
        p = Path(phrases_path) if phrases_path else base / PHRASES_TEMPLATE_FILE
        b = Path(boxes_path) if boxes_path else base / BOXES_TEMPLATE_FILE
        return cls(phrases=p.read_text(encoding="utf-8"), boxes=b.read_text(encoding="utf-8"))

    @property
    def digest(self) -> str:
        """Short hash of both templates; part of every cache key."""
        h = hashlib.sha256()
        for text in (self.phrases, "\x00", self.boxes):
            h.update(text.encode("utf-8"))
        return h.hexdigest()[:16]

    def render_phrases(self, instruction: str) -> str:
        # Trailing newlines of the template file are an editor artefact, not prompt content.
        return self.phrases.replace(INSTRUCTION_SLOT, instruction.strip()).strip()

    def render_boxes(self, phrases: Sequence[str]) -> str:
        return self.boxes.replace(OBJECT_LIST_SLOT, format_phrase_list(phrases)).strip()


def format_phrase_list(phrases: Sequence[str]) -> str:
    """JSON list, as in Fig. 9, so quotes and apostrophes inside phrases stay unambiguous."""
    return json.dumps(list(phrases), ensure_ascii=False)
