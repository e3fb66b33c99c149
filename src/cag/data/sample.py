"""The in-memory form of one multi-reference sample, shared by every stage.

The synthetic generator, the shard writer/reader, the grounding tool, the model and the
evaluation all speak this one type, so a field means the same thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from cag.data.truth import Truth

BOX_SCALE = 1000.0  # groundings use Qwen3-VL's 0-1000 relative coordinates


class GroundingError(ValueError):
    """A grounding that cannot be used (bad box, unknown reference, phrase not in the text)."""


@dataclass(frozen=True)
class Grounding:
    """One phrase of the instruction bound to a region of one reference image.

    ``image_id`` is 1-based ("Fig. k"); ``bbox_2d`` is ``[x1, y1, x2, y2]`` in 0-1000
    coordinates relative to that reference. A phrase may appear several times in the
    list with different boxes: the mask uses the union.
    """

    phrase: str
    image_id: int
    bbox_2d: tuple[float, float, float, float]

    def to_json(self) -> dict[str, Any]:
        return {"phrase": self.phrase, "image_id": int(self.image_id), "bbox_2d": [float(v) for v in self.bbox_2d]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Grounding:
        try:
            return cls(str(obj["phrase"]), int(obj["image_id"]), tuple(float(v) for v in obj["bbox_2d"]))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as exc:
            raise GroundingError(f"malformed grounding {obj!r}: {exc}") from exc


def validate_grounding(g: Grounding, num_references: int, instruction: str | None = None) -> None:
    """Raise :class:`GroundingError` naming the offending value; used at load time, before training."""
    if not 1 <= g.image_id <= num_references:
        raise GroundingError(
            f"grounding {g.phrase!r}: image_id={g.image_id} is outside 1..{num_references} (number of references)"
        )
    if len(g.bbox_2d) != 4:
        raise GroundingError(f"grounding {g.phrase!r}: bbox_2d={list(g.bbox_2d)} must have 4 numbers")
    x1, y1, x2, y2 = g.bbox_2d
    for name, v in zip(("x1", "y1", "x2", "y2"), g.bbox_2d, strict=True):
        if not 0.0 <= v <= BOX_SCALE:
            raise GroundingError(f"grounding {g.phrase!r}: bbox_2d {name}={v} is outside [0, 1000]")
    if x2 <= x1 or y2 <= y1:
        raise GroundingError(f"grounding {g.phrase!r}: bbox_2d={list(g.bbox_2d)} needs x2 > x1 and y2 > y1")
    if not g.phrase.strip():
        raise GroundingError("grounding with an empty phrase")
    if instruction is not None and g.phrase not in instruction:
        raise GroundingError(f"grounding phrase {g.phrase!r} does not occur in the instruction")


@dataclass
class Sample:
    """References (subjects first, then the scene), an instruction, its groundings, and optionally the target.

    ``conditioning`` holds precomputed frozen-model outputs (see :mod:`cag.data.cache`).
    ``truth`` carries what a synthetic generator knows (where each subject must appear,
    what it must look like, :class:`cag.data.truth.Truth`) so evaluation can score without
    a judge; it is ``None`` for real data.
    """

    key: str
    references: list[Image.Image]
    instruction: str
    groundings: list[Grounding] = field(default_factory=list)
    target: Image.Image | None = None
    task_type: str = "multi_character"
    truth: Truth | None = None
    conditioning: Any = None  # cag.data.cache.CachedConditioning when the shard carries cached VLM/codec outputs

    def validate(self) -> None:
        if "." in self.key:
            raise GroundingError(f"sample key {self.key!r} contains a dot (WebDataset splits extensions at dots)")
        if not self.references:
            raise GroundingError(f"sample {self.key!r} has no reference images")
        for g in self.groundings:
            try:
                validate_grounding(g, len(self.references), self.instruction)
            except GroundingError as exc:
                raise GroundingError(f"sample {self.key!r}: {exc}") from exc
