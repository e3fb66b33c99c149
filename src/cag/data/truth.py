"""What the synthetic generator knows about a sample, as a typed record.

The generator writes it, shards carry it as JSON, and the judge-free proxies of the
evaluation read it. One definition keeps the three in step: a field renamed here breaks
every reader at once instead of silently scoring against an empty dict.

Boxes are ``[x1, y1, x2, y2]`` in the 0-1000 coordinates of :data:`cag.data.sample.BOX_SCALE`,
relative to the image they describe; colours are RGB triples. Numbers are kept exactly as
given, so ``Truth.from_dict(d).to_dict() == d`` for anything the generator wrote and the
on-disk JSON of existing shards is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

Box = tuple[float, float, float, float]
Colour = tuple[int, int, int]


class TruthError(ValueError):
    """A truth that does not have the shape the synthetic generator writes; the message names the key."""


def _field(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, Mapping):
        raise TruthError(f"{where} is a {type(obj).__name__}, not an object")
    if key not in obj:
        raise TruthError(f"{where} has no {key!r}")
    return obj[key]


def _int(obj: Any, key: str, where: str) -> int:
    value = _field(obj, key, where)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TruthError(f"{where}: {key}={value!r} must be an int")
    return value


def _numbers(value: Any, count: int, what: str) -> tuple[Any, ...]:
    if isinstance(value, str | bytes) or not hasattr(value, "__len__") or len(value) != count:
        raise TruthError(f"{what}={value!r} must be {count} numbers")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise TruthError(f"{what}={value!r} must be {count} numbers")
    return tuple(value)


def _colours(value: Any, what: str) -> dict[str, Colour]:
    if not isinstance(value, Mapping):
        raise TruthError(f"{what} must map names to colours, got {value!r}")
    return {str(k): _numbers(v, 3, f"{what}[{k!r}]") for k, v in value.items()}  # type: ignore[misc]


def _json(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    return value


def _items(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise TruthError(f"{what} must be a list, got {type(value).__name__}")
    return list(value)


@dataclass(frozen=True)
class SubjectTruth:
    """One character: its reference (``image_id``, 1-based), where it stands in the target, what it wears."""

    name: str
    image_id: int
    phrase: str
    position: str
    target_bbox_2d: Box
    reference_bbox_2d: Box
    colors: Mapping[str, Colour]  # body part (hair, top, bottom) -> RGB

    @classmethod
    def from_dict(cls, obj: Any, where: str = "subject") -> SubjectTruth:
        name = str(_field(obj, "name", where))
        where = f"{where} {name!r}"
        return cls(
            name=name,
            image_id=_int(obj, "image_id", where),
            phrase=str(_field(obj, "phrase", where)),
            position=str(_field(obj, "position", where)),
            target_bbox_2d=_numbers(_field(obj, "target_bbox_2d", where), 4, f"{where} target_bbox_2d"),  # type: ignore[arg-type]
            reference_bbox_2d=_numbers(_field(obj, "reference_bbox_2d", where), 4, f"{where} reference_bbox_2d"),  # type: ignore[arg-type]
            colors=_colours(_field(obj, "colors", where), f"{where} colors"),
        )


@dataclass(frozen=True)
class PropTruth:
    """One prop of the scene: drawn in one colour, at the same place in the scene reference and the target."""

    name: str
    phrase: str
    color: Colour
    target_bbox_2d: Box
    reference_bbox_2d: Box

    @classmethod
    def from_dict(cls, obj: Any, where: str = "prop") -> PropTruth:
        name = str(_field(obj, "name", where))
        where = f"{where} {name!r}"
        return cls(
            name=name,
            phrase=str(_field(obj, "phrase", where)),
            color=_numbers(_field(obj, "color", where), 3, f"{where} color"),  # type: ignore[arg-type]
            target_bbox_2d=_numbers(_field(obj, "target_bbox_2d", where), 4, f"{where} target_bbox_2d"),  # type: ignore[arg-type]
            reference_bbox_2d=_numbers(_field(obj, "reference_bbox_2d", where), 4, f"{where} reference_bbox_2d"),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class SceneTruth:
    """The scene reference (``image_id``), its backdrop colours (sky, ground) and its props."""

    image_id: int
    colors: Mapping[str, Colour]
    props: tuple[PropTruth, ...]

    @classmethod
    def from_dict(cls, obj: Any, where: str = "scene") -> SceneTruth:
        props = _items(_field(obj, "props", where), f"{where} props")
        return cls(
            image_id=_int(obj, "image_id", where),
            colors=_colours(_field(obj, "colors", where), f"{where} colors"),
            props=tuple(PropTruth.from_dict(p, f"{where} prop {i}") for i, p in enumerate(props)),
        )


@dataclass(frozen=True)
class Truth:
    """Everything a synthetic sample's instruction asks for, so a generated image can be scored without a judge."""

    image_size: tuple[int, int]
    subjects: tuple[SubjectTruth, ...]
    scene: SceneTruth

    def to_dict(self) -> dict[str, Any]:
        """The JSON form shards store (tuples as lists, keys as the generator has always written them)."""
        return _json(asdict(self))

    @classmethod
    def from_dict(cls, obj: Any) -> Truth:
        """The record from its JSON form; :class:`TruthError` names the first key that is missing or malformed."""
        subjects = _items(_field(obj, "subjects", "truth"), "truth subjects")
        return cls(
            image_size=_numbers(_field(obj, "image_size", "truth"), 2, "truth image_size"),  # type: ignore[arg-type]
            subjects=tuple(SubjectTruth.from_dict(s, f"truth subject {i}") for i, s in enumerate(subjects)),
            scene=SceneTruth.from_dict(_field(obj, "scene", "truth"), "truth scene"),
        )
