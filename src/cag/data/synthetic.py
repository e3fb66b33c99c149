"""Procedural multi-subject benchmark: the platform's embedded default data.

No real images can be downloaded on our machines, so training, inference and evaluation
run on samples drawn here: 1-3 invented characters, each on its own reference image, one
scene reference (sky, ground and named props), a paper-style instruction, exact
groundings for every phrase that names something in a reference, and a target image
rendered from that instruction. Because the generator knows the truth (where each
subject stands, which colours it wears) it stores it in ``Sample.truth`` so a generated
image can be scored without a judge.

Everything is drawn without anti-aliasing, so each pixel has exactly one owner; a label
image painted alongside the RGB image gives every phrase an exact box, even where a hat
hides part of the hair.

Train, val and test characters are disjoint (separate name pools, globally unique
attribute combinations), and the roster is fixed (independent of ``seed``) so that this
holds whatever seeds the splits were generated with. ``train_roster="per_sample"`` draws
each training character's appearance per sample instead (never a val or test one's). ``seed`` varies everything else:
which characters meet, where they stand, the shot, the scene and the props.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cag.data.sample import BOX_SCALE, Grounding, Sample
from cag.data.truth import PropTruth, SceneTruth, SubjectTruth, Truth

RGB = tuple[int, int, int]

SPLITS = ("train", "val", "test")
MIN_IMAGE_SIZE = 64  # below this, glasses and stripes vanish and boxes stop being exact
MAX_CHARACTERS = 3  # 3 characters + 1 scene = 4 references, the paper's maximum

# Invented short names; one character per name. Disjoint pools make the splits' characters disjoint.
_NAMES: dict[str, tuple[str, ...]] = {
    "train": (
        "Rin", "Kai", "Mio", "Taro", "Suzu", "Noa", "Ren", "Yuki", "Hana", "Sora",
        "Riku", "Emi", "Jun", "Aya", "Ken", "Nao", "Tomo", "Koa", "Lio", "Mika",
        "Zed", "Ivo", "Pia", "Oren", "Tali", "Bo", "Cass", "Dara", "Fenn", "Gil",
    ),
    "val": ("Fia", "Dov", "Mave", "Ulo", "Zia", "Hux", "Pim", "Sel"),
    "test": (
        "Xi", "Lumi", "Vex", "Quill", "Yara", "Odo", "Bex", "Juno", "Tiva", "Nilo",
        "Safi", "Raze", "Kito", "Wim", "Elo",
    ),
}

# Colour names are single words and never substrings of one another, so no phrase hides inside another.
_HAIR_COLOURS: dict[str, RGB] = {
    "black": (28, 28, 32),
    "brown": (105, 60, 25),
    "blonde": (238, 200, 80),
    "red": (205, 35, 35),
    "pink": (245, 120, 185),
    "blue": (45, 95, 225),
    "silver": (165, 170, 185),
    "green": (40, 150, 70),
    "purple": (125, 55, 175),
    "orange": (245, 135, 30),
}
_TOP_COLOURS: dict[str, RGB] = {
    "red": (215, 40, 45),
    "orange": (245, 140, 35),
    "yellow": (240, 215, 40),
    "green": (50, 165, 65),
    "teal": (0, 135, 135),
    "blue": (40, 90, 220),
    "purple": (135, 55, 180),
    "pink": (240, 115, 175),
    "lime": (165, 220, 50),
    "cyan": (60, 200, 230),
    "black": (35, 35, 40),
}
_BOTTOM_COLOURS: dict[str, RGB] = {
    "navy": (25, 35, 110),
    "black": (30, 30, 35),
    "brown": (110, 65, 30),
    "gray": (125, 125, 130),
    "blue": (50, 100, 200),
    "olive": (110, 120, 40),
    "maroon": (120, 25, 45),
    "khaki": (195, 175, 120),
}
_ACCESSORY_COLOURS: dict[str, RGB] = {
    "red": (210, 30, 40),
    "yellow": (245, 210, 30),
    "black": (25, 25, 25),
    "blue": (35, 80, 215),
    "green": (40, 155, 60),
    "purple": (130, 50, 180),
    "orange": (245, 130, 25),
}
_PROP_COLOURS: dict[str, RGB] = {
    "red": (210, 40, 40),
    "orange": (240, 135, 30),
    "yellow": (240, 210, 40),
    "green": (40, 140, 50),
    "blue": (40, 80, 210),
    "purple": (130, 50, 170),
    "pink": (240, 120, 180),
    "brown": (115, 70, 35),
    "white": (250, 250, 250),
}
_HAIR_STYLES = ("short hair", "long hair", "twin-tails", "spiky hair")
_TOP_PATTERNS = ("solid", "striped", "dotted")
_ACCESSORIES = (None, "hat", "glasses", "scarf")
_SKIN_TONES: tuple[RGB, ...] = ((250, 222, 195), (232, 190, 150), (190, 140, 100))
_REFERENCE_BACKGROUNDS: tuple[RGB, ...] = ((244, 244, 238), (238, 242, 246), (246, 240, 236))
_PRONOUNS = (("she", "her", "her"), ("he", "his", "him"), ("they", "their", "them"))

# name -> (sky, ground); the evaluation checks these colours in the target.
_PLACES: dict[str, tuple[RGB, RGB]] = {
    "park": ((150, 200, 250), (95, 175, 85)),
    "beach": ((115, 185, 240), (236, 214, 160)),
    "city street": ((200, 210, 225), (140, 140, 148)),
    "snowy field": ((185, 200, 220), (248, 248, 252)),
    "desert": ((250, 225, 170), (215, 165, 95)),
    "night plaza": ((25, 30, 75), (75, 75, 88)),
    "meadow at sunset": ((250, 170, 120), (120, 150, 60)),
}
_PROP_KINDS = ("bench", "tree", "lamp post", "house", "car", "umbrella", "mailbox", "tent")
# Prop footprint as fractions of the image (width, height).
_PROP_SIZE: dict[str, tuple[float, float]] = {
    "bench": (0.26, 0.12),
    "tree": (0.22, 0.42),
    "lamp post": (0.09, 0.46),
    "house": (0.28, 0.3),
    "car": (0.3, 0.14),
    "umbrella": (0.22, 0.28),
    "mailbox": (0.09, 0.16),
    "tent": (0.26, 0.2),
}

# Character height as a fraction of the target's height, and where the feet stand.
_SHOTS: dict[str, tuple[float, float]] = {"close-up": (0.86, 0.985), "medium": (0.5, 0.93), "long": (0.32, 0.85)}
_SHOT_WORDS: dict[str, tuple[str, ...]] = {
    "close-up": ("Close-up.", "Front-facing close-up.", "Eye-level close-up."),
    "medium": ("Medium shot.", "Eye-level medium shot.", "Front-facing medium shot."),
    "long": ("Long shot.", "Wide long shot.", "Eye-level long shot."),
}
_POSITION_X = {"left": 0.22, "centre": 0.5, "right": 0.78}
_POSITION_WORDS = {
    "left": ("on the left", "on the left side"),
    "centre": ("in the centre", "in the middle"),
    "right": ("on the right", "on the right side"),
}
_HORIZON_Y = 0.56  # sky above, ground below, as a fraction of the height
_MAX_HIDDEN = 0.15  # largest share of a prop's box that characters may cover in the target

# Label-image values: character c (0-based) part p -> 10 * (c + 1) + p; prop j -> 100 + j.
_BODY, _HAIR, _TOP, _BOTTOM, _ACC = 1, 2, 3, 4, 5
_PROP_LABEL = 100
PLACE_MODES = ("text", "centre", "ordered")


def position_x(position: str) -> float:
    """Horizontal centre (0-1) of a subject standing at ``position`` (left / centre / right)."""
    return _POSITION_X[position]


def place_phrase(text: str, position: str) -> str:
    """The words of ``text`` that say a subject stands at ``position``, as written there.

    The longest variant wins ("on the left side", not the "on the left" inside it). Subjects of one
    sample stand at different places, so in a whole instruction the words name one subject.
    """
    said = [w for p in _POSITION_WORDS[position] for w in (p[:1].upper() + p[1:], p) if w in text]
    if not said:
        raise ValueError(f"no words for the place {position!r} in {text[:80]!r}")
    return max(said, key=len)


@dataclass
class SyntheticConfig:
    """What varies the benchmark; ``num_characters`` is an int or an inclusive ``[min, max]`` range."""

    image_size: int = 128
    num_characters: int | Sequence[int] = 2
    seed: int = 0
    # the difficulty ladder (conf/synthetic/level0..4.yaml; docs/design.md, 'Difficulty ladder'): what the
    # instruction decides. "text": drawn per sample and said in the instruction; a fixed value: every sample
    # text | centre (one character only) | ordered: from the text, the references standing left to right in
    # their order, so a subject's reference slot alone says where it stands (binding without reading the text)
    place: str = "text"
    shot: str = "text"             # text | close-up | medium | long
    describe_colours: bool = True  # False: the instruction names each subject and its place, not what it wears
    # True: each subject's place words ("on the right side") are grounded to its reference as well as its name
    # and clothes, so eq. 9's mask ties the words that say where to the reference that says what; the
    # instruction, the images and the test targets are the same as with False (only the groundings differ)
    ground_places: bool = False
    # who the training split's characters are (val and test keep their fixed casts whatever this says):
    # "fixed": the 30-character training roster, each always drawn the same way; "per_sample": every
    # training character's appearance drawn per sample (training names, never a val/test combination),
    # so a subject's look can come from its reference only and cannot be learnt by name
    train_roster: str = "fixed"

    def character_range(self) -> tuple[int, int]:
        n = self.num_characters
        if isinstance(n, bool):
            raise ValueError(f"SyntheticConfig.num_characters={n!r} must be an int or [min, max]")
        if isinstance(n, int):
            lo, hi = n, n
        else:
            values = list(n)
            if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise ValueError(f"SyntheticConfig.num_characters={n!r} must be an int or [min, max]")
            lo, hi = values
        if not 1 <= lo <= hi <= MAX_CHARACTERS:
            raise ValueError(
                f"SyntheticConfig.num_characters={n!r}: need 1 <= min <= max <= {MAX_CHARACTERS} "
                "(one scene reference is added, so 2-4 references in all)"
            )
        return lo, hi

    def check(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int):
            raise ValueError(f"SyntheticConfig.image_size={self.image_size!r} must be an int")
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(
                f"SyntheticConfig.image_size={self.image_size} is below {MIN_IMAGE_SIZE}: "
                "small parts (glasses, stripes) would vanish and their boxes would be wrong"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"SyntheticConfig.seed={self.seed!r} must be an int")
        lo, hi = self.character_range()
        if self.place not in PLACE_MODES:
            raise ValueError(f"SyntheticConfig.place={self.place!r} must be one of {list(PLACE_MODES)}")
        if self.place == "centre" and hi > 1:
            raise ValueError(f"SyntheticConfig.place='centre' needs num_characters=1 (got {self.num_characters!r}): "
                             "only one character stands in the centre")
        if self.shot != "text" and self.shot not in _SHOTS:
            raise ValueError(f"SyntheticConfig.shot={self.shot!r} must be 'text' or one of {list(_SHOTS)}")
        if self.shot != "text" and hi > 1 and _SHOTS[self.shot][0] > _max_height(_positions_for(hi, None)):
            raise ValueError(f"SyntheticConfig.shot={self.shot!r} is too tall for {hi} characters side by side")
        if not isinstance(self.describe_colours, bool):
            raise ValueError(f"SyntheticConfig.describe_colours={self.describe_colours!r} must be true or false")
        if not isinstance(self.ground_places, bool):
            raise ValueError(f"SyntheticConfig.ground_places={self.ground_places!r} must be true or false")
        if self.train_roster not in TRAIN_ROSTERS:
            raise ValueError(f"SyntheticConfig.train_roster={self.train_roster!r} must be one of {list(TRAIN_ROSTERS)}")


@dataclass(frozen=True)
class Character:
    """One recurring identity: a name plus the attribute combination drawn for it."""

    name: str
    pronouns: tuple[str, str, str]  # subject, possessive, object
    hair_colour: str
    hair_style: str
    top_colour: str
    top_pattern: str
    bottom_colour: str
    accessory: str | None
    accessory_colour: str | None
    skin: RGB

    @property
    def combination(self) -> tuple[Any, ...]:
        return (
            self.hair_colour, self.hair_style, self.top_colour, self.top_pattern,
            self.bottom_colour, self.accessory, self.accessory_colour,
        )

    @property
    def hair_phrase(self) -> str:
        return f"{self.hair_colour} {self.hair_style}"

    @property
    def top_phrase(self) -> str:
        pattern = "" if self.top_pattern == "solid" else f"{self.top_pattern} "
        return f"{self.top_colour} {pattern}shirt"

    @property
    def bottom_phrase(self) -> str:
        return f"{self.bottom_colour} pants"

    @property
    def accessory_phrase(self) -> str | None:
        if self.accessory is None:
            return None
        return f"{self.accessory_colour} {self.accessory}"

    def colours(self) -> dict[str, RGB]:
        return {
            "hair": _HAIR_COLOURS[self.hair_colour],
            "top": _TOP_COLOURS[self.top_colour],
            "bottom": _BOTTOM_COLOURS[self.bottom_colour],
        }


def _colour_distance(a: RGB, b: RGB) -> int:
    return sum(abs(x - y) for x, y in zip(a, b, strict=True))


def _far(colour: RGB, others: Sequence[RGB], threshold: int = 150) -> bool:
    """Parts of one character must differ clearly, or a colour check could not tell hair from shirt."""
    return all(_colour_distance(colour, o) > threshold for o in others)


def _draw_appearance(rng: random.Random, name: str) -> Character:
    """One attribute combination whose parts differ clearly in colour (hair, shirt, pants, accessory)."""
    hair = rng.choice(list(_HAIR_COLOURS))
    worn = [_HAIR_COLOURS[hair]]
    top = rng.choice([c for c, rgb in _TOP_COLOURS.items() if c != hair and _far(rgb, worn)])
    worn.append(_TOP_COLOURS[top])
    bottom = rng.choice(
        [c for c, rgb in _BOTTOM_COLOURS.items() if c not in (hair, top) and _far(rgb, worn)]
    )
    worn.append(_BOTTOM_COLOURS[bottom])
    accessory = rng.choice(_ACCESSORIES)
    acc_colour = (
        None if accessory is None
        else rng.choice([
            c for c, rgb in _ACCESSORY_COLOURS.items()
            if c not in (hair, top, bottom) and _far(rgb, worn, 120)
        ])
    )
    return Character(
        name=name,
        pronouns=rng.choice(_PRONOUNS),
        hair_colour=hair,
        hair_style=rng.choice(_HAIR_STYLES),
        top_colour=top,
        top_pattern=rng.choice(_TOP_PATTERNS),
        bottom_colour=bottom,
        accessory=accessory,
        accessory_colour=acc_colour,
        skin=rng.choice(_SKIN_TONES),
    )


def _build_roster() -> dict[str, tuple[Character, ...]]:
    """Fixed roster shared by every seed, so split disjointness never depends on how data was generated."""
    rng = random.Random(20260101)
    used: set[tuple[Any, ...]] = set()
    roster: dict[str, tuple[Character, ...]] = {}
    for split in SPLITS:
        chars = []
        for name in _NAMES[split]:
            while True:
                ch = _draw_appearance(rng, name)
                if ch.combination not in used:
                    used.add(ch.combination)
                    chars.append(ch)
                    break
        roster[split] = tuple(chars)
    return roster


ROSTER: dict[str, tuple[Character, ...]] = _build_roster()
# what a per-sample training character may never look like: any val or test character
_HELD_OUT_COMBINATIONS = frozenset(c.combination for split in ("val", "test") for c in ROSTER[split])
TRAIN_ROSTERS = ("fixed", "per_sample")


def characters(split: str) -> tuple[Character, ...]:
    """The split's fixed cast (tests and evaluation use it to check disjointness)."""
    _check_split(split)
    return ROSTER[split]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


# --------------------------------------------------------------------------- drawing


class _Painter:
    """Draws in fractions of a box onto an RGB image and, in lockstep, a label image.

    Fractions keep one character design valid at every size (reference and target);
    the label image is what makes the grounding boxes exact.
    """

    def __init__(self, rgb: Image.Image, labels: Image.Image, box: tuple[float, float, float, float]):
        self.rgb = ImageDraw.Draw(rgb)
        self.lab = ImageDraw.Draw(labels)
        self.x0, self.y0, self.w, self.h = box

    def _x(self, f: float) -> int:
        return int(round(self.x0 + f * self.w))

    def _y(self, f: float) -> int:
        return int(round(self.y0 + f * self.h))

    def _box(self, fx0: float, fy0: float, fx1: float, fy1: float) -> list[int]:
        x0, y0 = self._x(fx0), self._y(fy0)
        x1, y1 = max(x0, self._x(fx1) - 1), max(y0, self._y(fy1) - 1)
        return [x0, y0, x1, y1]

    def rect(self, f: tuple[float, float, float, float], colour: RGB, label: int) -> None:
        b = self._box(*f)
        self.rgb.rectangle(b, fill=colour)
        self.lab.rectangle(b, fill=label)

    def ellipse(self, f: tuple[float, float, float, float], colour: RGB, label: int) -> None:
        b = self._box(*f)
        self.rgb.ellipse(b, fill=colour)
        self.lab.ellipse(b, fill=label)

    def chord(self, f: tuple[float, float, float, float], start: float, end: float, colour: RGB, label: int) -> None:
        b = self._box(*f)
        self.rgb.chord(b, start, end, fill=colour)
        self.lab.chord(b, start, end, fill=label)

    def polygon(self, pts: Sequence[tuple[float, float]], colour: RGB, label: int) -> None:
        xy = [(self._x(fx), self._y(fy)) for fx, fy in pts]
        self.rgb.polygon(xy, fill=colour)
        self.lab.polygon(xy, fill=label)

    def line(self, pts: Sequence[tuple[float, float]], colour: RGB, label: int, width_frac: float) -> None:
        xy = [(self._x(fx), self._y(fy)) for fx, fy in pts]
        width = max(1, int(round(width_frac * self.w)))
        self.rgb.line(xy, fill=colour, width=width)
        self.lab.line(xy, fill=label, width=width)

    def stripes(self, f: tuple[float, float, float, float], colour: RGB, label: int) -> None:
        """Horizontal bands one third of the period, so the base colour stays the majority."""
        x0, y0, x1, y1 = self._box(*f)
        period = max(3, int(round(self.h * 0.035)))
        band = max(1, period // 3)
        for y in range(y0 + period - band, y1 + 1, period):
            b = [x0, y, x1, min(y1, y + band - 1)]
            self.rgb.rectangle(b, fill=colour)
            self.lab.rectangle(b, fill=label)

    def dots(self, f: tuple[float, float, float, float], colour: RGB, label: int) -> None:
        x0, y0, x1, y1 = self._box(*f)
        period = max(4, int(round(self.h * 0.045)))
        size = max(1, period // 3)
        for row, y in enumerate(range(y0 + period // 2, y1 - size + 1, period)):
            start = x0 + (period // 2 if row % 2 else period // 4)
            for x in range(start, x1 - size + 1, period):
                b = [x, y, x + size - 1, y + size - 1]
                self.rgb.rectangle(b, fill=colour)
                self.lab.rectangle(b, fill=label)


def _lighten(c: RGB, amount: float) -> RGB:
    return tuple(int(round(v + (255 - v) * amount)) for v in c)  # type: ignore[return-value]


def _darken(c: RGB, amount: float) -> RGB:
    return tuple(int(round(v * (1 - amount))) for v in c)  # type: ignore[return-value]


def _pattern_colour(c: RGB) -> RGB:
    """A contrasting but related colour: light on dark tops, dark on light ones."""
    return _lighten(c, 0.65) if sum(c) < 450 else _darken(c, 0.55)


# A character occupies a box with width:height = 1:2; all coordinates below are fractions of it.
_TORSO = (0.22, 0.34, 0.78, 0.63)
_SLEEVES = ((0.08, 0.35, 0.22, 0.56), (0.78, 0.35, 0.92, 0.56))
CHARACTER_ASPECT = 0.5  # width / height


def _draw_character(p: _Painter, ch: Character, base: int) -> None:
    """Back-to-front: hair behind the head, head, clothes, hair over the shoulders, accessory on top."""
    hair = _HAIR_COLOURS[ch.hair_colour]
    top = _TOP_COLOURS[ch.top_colour]
    bottom = _BOTTOM_COLOURS[ch.bottom_colour]
    body, lab_hair, lab_top, lab_bottom, lab_acc = (base + k for k in (_BODY, _HAIR, _TOP, _BOTTOM, _ACC))

    if ch.hair_style == "twin-tails":
        p.ellipse((0.03, 0.12, 0.25, 0.42), hair, lab_hair)
        p.ellipse((0.75, 0.12, 0.97, 0.42), hair, lab_hair)
    # head and neck
    p.rect((0.42, 0.3, 0.58, 0.35), ch.skin, body)
    p.ellipse((0.26, 0.09, 0.74, 0.33), ch.skin, body)
    # hair cap (top half of a slightly larger ellipse) plus a fringe
    p.chord((0.23, 0.07, 0.77, 0.31), 180, 360, hair, lab_hair)
    p.rect((0.27, 0.18, 0.73, 0.2), hair, lab_hair)
    if ch.hair_style == "spiky hair":
        for cx in (0.3, 0.42, 0.54, 0.66):
            p.polygon([(cx - 0.06, 0.1), (cx + 0.02, 0.015), (cx + 0.08, 0.1)], hair, lab_hair)
    # face
    eye = (25, 25, 30)
    p.rect((0.36, 0.215, 0.42, 0.24), eye, body)
    p.rect((0.58, 0.215, 0.64, 0.24), eye, body)
    p.rect((0.45, 0.285, 0.55, 0.295), _darken(ch.skin, 0.35), body)
    # legs, shoes, clothes
    p.rect((0.24, 0.63, 0.76, 0.72), bottom, lab_bottom)
    p.rect((0.24, 0.72, 0.47, 0.93), bottom, lab_bottom)
    p.rect((0.53, 0.72, 0.76, 0.93), bottom, lab_bottom)
    p.rect((0.22, 0.93, 0.46, 0.98), (45, 40, 40), body)
    p.rect((0.54, 0.93, 0.78, 0.98), (45, 40, 40), body)
    for sleeve in _SLEEVES:
        p.rect(sleeve, top, lab_top)
    p.rect(_TORSO, top, lab_top)
    p.ellipse((0.08, 0.555, 0.22, 0.625), ch.skin, body)
    p.ellipse((0.78, 0.555, 0.92, 0.625), ch.skin, body)
    accent = _pattern_colour(top)
    if ch.top_pattern == "striped":
        for part in (_TORSO, *_SLEEVES):
            p.stripes(part, accent, lab_top)
    elif ch.top_pattern == "dotted":
        for part in (_TORSO, *_SLEEVES):
            p.dots(part, accent, lab_top)
    if ch.hair_style == "long hair":
        p.rect((0.17, 0.14, 0.29, 0.5), hair, lab_hair)
        p.rect((0.71, 0.14, 0.83, 0.5), hair, lab_hair)
    # accessory
    if ch.accessory is not None:
        acc = _ACCESSORY_COLOURS[ch.accessory_colour or "black"]
        if ch.accessory == "hat":
            p.rect((0.32, 0.0, 0.68, 0.075), acc, lab_acc)
            p.rect((0.17, 0.065, 0.83, 0.095), acc, lab_acc)
        elif ch.accessory == "glasses":
            p.rect((0.31, 0.2, 0.47, 0.255), acc, lab_acc)
            p.rect((0.53, 0.2, 0.69, 0.255), acc, lab_acc)
            p.rect((0.47, 0.215, 0.53, 0.23), acc, lab_acc)
            lens = _lighten(ch.skin, 0.4)
            p.rect((0.34, 0.21, 0.44, 0.245), lens, lab_acc)
            p.rect((0.56, 0.21, 0.66, 0.245), lens, lab_acc)
        elif ch.accessory == "scarf":
            p.rect((0.26, 0.32, 0.74, 0.37), acc, lab_acc)
            p.rect((0.56, 0.37, 0.66, 0.5), acc, lab_acc)


def _draw_prop(p: _Painter, kind: str, colour: RGB, label: int) -> None:
    """Each prop fills its footprint; most of its pixels carry the named colour (the evaluation samples it)."""
    dark = _darken(colour, 0.45) if sum(colour) > 200 else _lighten(colour, 0.4)
    if kind == "bench":
        p.rect((0.0, 0.0, 1.0, 0.35), colour, label)
        p.rect((0.0, 0.45, 1.0, 0.7), colour, label)
        p.rect((0.05, 0.7, 0.15, 1.0), dark, label)
        p.rect((0.85, 0.7, 0.95, 1.0), dark, label)
    elif kind == "tree":
        p.rect((0.4, 0.55, 0.6, 1.0), (110, 70, 35), label)
        p.ellipse((0.0, 0.0, 1.0, 0.68), colour, label)
    elif kind == "lamp post":
        p.rect((0.3, 0.12, 0.7, 1.0), colour, label)
        p.rect((0.0, 0.0, 1.0, 0.14), colour, label)
        p.rect((0.15, 0.14, 0.85, 0.2), (255, 240, 150), label)
        p.rect((0.1, 0.94, 0.9, 1.0), colour, label)
    elif kind == "house":
        p.polygon([(0.0, 0.4), (0.5, 0.0), (1.0, 0.4)], dark, label)
        p.rect((0.05, 0.4, 0.95, 1.0), colour, label)
        p.rect((0.4, 0.65, 0.6, 1.0), dark, label)
    elif kind == "car":
        p.rect((0.2, 0.0, 0.75, 0.4), colour, label)
        p.rect((0.0, 0.35, 1.0, 0.8), colour, label)
        p.rect((0.3, 0.08, 0.65, 0.35), (200, 225, 240), label)
        p.ellipse((0.1, 0.6, 0.3, 1.0), (30, 30, 30), label)
        p.ellipse((0.7, 0.6, 0.9, 1.0), (30, 30, 30), label)
    elif kind == "umbrella":
        p.chord((0.0, 0.0, 1.0, 0.8), 180, 360, colour, label)
        p.rect((0.46, 0.4, 0.54, 1.0), dark, label)
    elif kind == "mailbox":
        p.rect((0.0, 0.0, 1.0, 0.6), colour, label)
        p.rect((0.35, 0.6, 0.65, 1.0), dark, label)
    elif kind == "tent":
        p.polygon([(0.0, 1.0), (0.5, 0.0), (1.0, 1.0)], colour, label)
        p.polygon([(0.4, 1.0), (0.5, 0.6), (0.6, 1.0)], dark, label)
    else:  # pragma: no cover - _PROP_KINDS is closed
        raise ValueError(f"unknown prop kind {kind!r}")


def _label_bbox(labels: np.ndarray, values: Callable[[np.ndarray], np.ndarray], what: str) -> list[float]:
    """Pixel-exact box of the pixels that carry a label, in 0-1000 coordinates of that image."""
    mask = values(labels)
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if xs.size == 0:
        raise RuntimeError(f"synthetic generator bug: {what} left no visible pixels")
    h, w = labels.shape
    return [
        round(float(xs[0]) / w * BOX_SCALE, 2),
        round(float(ys[0]) / h * BOX_SCALE, 2),
        round(float(xs[-1] + 1) / w * BOX_SCALE, 2),
        round(float(ys[-1] + 1) / h * BOX_SCALE, 2),
    ]


def _part_box(labels: np.ndarray, base: int, part: int, what: str) -> list[float]:
    return _label_bbox(labels, lambda a: a == base + part, what)


def _character_box(labels: np.ndarray, base: int, what: str) -> list[float]:
    return _label_bbox(labels, lambda a: (a > base) & (a <= base + _ACC), what)


# --------------------------------------------------------------------------- layout


@dataclass
class _Prop:
    kind: str
    colour_name: str
    box: tuple[float, float, float, float]  # fractions of the image

    @property
    def name(self) -> str:
        return f"{self.colour_name} {self.kind}"


@dataclass
class _Placement:
    character: Character
    position: str
    box: tuple[float, float, float, float]  # fractions of the target


@dataclass
class _Layout:
    shot: str
    place: str
    placements: list[_Placement]
    props: list[_Prop] = field(default_factory=list)


def _choose_cast(rng: random.Random, split: str, n: int, train_roster: str = "fixed") -> list[Character]:
    """Distinct hair and top colours and unique phrases, so every phrase names one thing in one reference.

    ``train_roster="per_sample"`` (training split only): each character's appearance is drawn for this
    sample under a training name, never one of a val or test character's combinations. A fixed roster
    of 30 lets a model learn each character by name and stop reading its reference
    (experiments/results/binding/memorised_characters.md); a per-sample appearance can only be read.
    """
    pool = list(ROSTER[split])
    fresh = split == "train" and train_roster == "per_sample"
    for _ in range(1000):
        if fresh:
            cast = []
            for name in rng.sample(_NAMES["train"], n):
                ch = _draw_appearance(rng, name)
                while ch.combination in _HELD_OUT_COMBINATIONS:
                    ch = _draw_appearance(rng, name)
                cast.append(ch)
        else:
            cast = rng.sample(pool, n)
        phrases = [ph for c in cast for ph in (c.hair_phrase, c.top_phrase, c.bottom_phrase, c.accessory_phrase) if ph]
        if (
            len({c.hair_colour for c in cast}) == n
            and len({c.top_colour for c in cast}) == n
            and len(set(phrases)) == len(phrases)
        ):
            return cast
    raise RuntimeError(f"could not draw {n} visually distinct characters from split {split!r}")


def _positions_for(n: int, rng: random.Random | None) -> list[str]:
    """Where ``n`` characters stand; ``rng`` None gives the tightest arrangement (for checking a fixed shot)."""
    if n == 1:
        return [rng.choice(("left", "centre", "right"))] if rng is not None else ["left"]
    if n == 2:
        pairs = (("left", "right"), ("left", "centre"), ("centre", "right"))
        return list(rng.choice(pairs)) if rng is not None else ["left", "centre"]
    return ["left", "centre", "right"]


def _max_height(positions: Sequence[str]) -> float:
    """A character's width is half its height; neighbours must not touch, and nobody leaves the frame."""
    xs = sorted(_POSITION_X[p] for p in positions)
    gap = min((b - a for a, b in zip(xs, xs[1:], strict=False)), default=1.0)
    return min(2 * 0.94 * gap, 2 * 2 * min(min(xs), 1 - max(xs)) * 0.99)


def _layout(rng: random.Random, cast: list[Character], cfg: SyntheticConfig) -> _Layout:
    positions = ["centre"] if cfg.place == "centre" else _positions_for(len(cast), rng)
    shots = [s for s, (h, _) in _SHOTS.items() if h <= _max_height(positions)] or ["long"]
    if cfg.shot == "text":
        shot = rng.choice(shots)
    elif cfg.shot in shots:
        shot = cfg.shot
    else:  # a fixed shot too tall for this place: the tallest that fits (close-up at the side)
        shot = shots[0]
    height, feet = _SHOTS[shot]
    order = list(positions)
    rng.shuffle(order)  # reference order and left-to-right order are independent
    if cfg.place == "ordered":  # after the shuffle, so the rest of the sample is the same as under "text"
        order.sort(key=position_x)
    placements = []
    for ch, pos in zip(cast, order, strict=True):
        cx = _POSITION_X[pos]
        w = height * CHARACTER_ASPECT
        placements.append(_Placement(ch, pos, (cx - w / 2, feet - height, cx + w / 2, feet)))
    place = rng.choice(list(_PLACES))
    worn = [rgb for ch in cast for rgb in ch.colours().values()]
    worn += [_ACCESSORY_COLOURS[ch.accessory_colour] for ch in cast if ch.accessory_colour is not None]
    props = _place_props(rng, place, [p.box for p in placements], worn)
    return _Layout(shot=shot, place=place, placements=placements, props=props)


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, w) * max(0.0, h)


def _place_props(
    rng: random.Random, place: str, occupied: list[tuple[float, float, float, float]], worn: list[RGB]
) -> list[_Prop]:
    """Props stand on the ground behind the characters, placed where they stay visible.

    A prop the instruction names but the target hides would make the target a wrong
    answer, so a prop may lose at most ``_MAX_HIDDEN`` of its box to characters; when no
    place is free at full size it is drawn smaller (further back), and a kind that fits
    nowhere is swapped for another. Colours stand out from the sky, the ground and,
    where the palette allows, from everything the characters wear.
    """
    sky, ground = _PLACES[place]
    colours = [c for c, rgb in _PROP_COLOURS.items() if _far(rgb, (sky, ground), 160)]
    distinct = [c for c in colours if _far(_PROP_COLOURS[c], worn, 100)]
    if len(distinct) >= 2:
        colours = distinct
    n = rng.choice((1, 2))
    chosen_colours = rng.sample(colours, 2)
    kinds = list(_PROP_KINDS)
    rng.shuffle(kinds)
    props: list[_Prop] = []
    fallback: tuple[float, float, tuple[float, float, float, float], str] | None = None
    for kind in kinds:
        if len(props) == n:
            break
        for scale in (1.0, 0.75, 0.55):
            w, h = (v * scale for v in _PROP_SIZE[kind])
            base = _HORIZON_Y + rng.uniform(0.03, 0.1) * scale  # smaller means further back
            candidates = []
            for step in range(21):
                x0 = 0.02 + step * (0.96 - w) / 20
                box = (x0, base - h, x0 + w, base)
                if any(_overlap(box, other.box) > 0 for other in props):
                    continue  # a prop hidden by another could not be grounded in the scene reference
                hidden = round(sum(_overlap(box, t) for t in occupied) / (w * h), 6)
                candidates.append((hidden, rng.random(), box, kind))
            if not candidates:
                continue
            best = min(candidates)
            if fallback is None or best[:2] < fallback[:2]:
                fallback = best
            if best[0] <= _MAX_HIDDEN:
                props.append(_Prop(kind, chosen_colours[len(props)], best[2]))
                break
    if not props and fallback is not None:
        props.append(_Prop(fallback[3], chosen_colours[0], fallback[2]))
    return props


# --------------------------------------------------------------------------- rendering


def _render_scene(size: int, layout: _Layout) -> tuple[Image.Image, Image.Image]:
    sky, ground = _PLACES[layout.place]
    rgb = Image.new("RGB", (size, size), sky)
    labels = Image.new("L", (size, size), 0)
    horizon = int(round(_HORIZON_Y * size))
    ImageDraw.Draw(rgb).rectangle([0, horizon, size - 1, size - 1], fill=ground)
    for j, prop in enumerate(layout.props):
        x0, y0, x1, y1 = (v * size for v in prop.box)
        _draw_prop(_Painter(rgb, labels, (x0, y0, x1 - x0, y1 - y0)), prop.kind, _PROP_COLOURS[prop.colour_name],
                   _PROP_LABEL + j)
    return rgb, labels


def _render_reference(size: int, ch: Character, rng: random.Random) -> tuple[Image.Image, np.ndarray]:
    """Jittered scale and offset so a character's reference box varies from sample to sample."""
    bg = rng.choice(_REFERENCE_BACKGROUNDS)
    rgb = Image.new("RGB", (size, size), bg)
    labels = Image.new("L", (size, size), 0)
    height = rng.uniform(0.78, 0.94) * size
    width = height * CHARACTER_ASPECT
    x0 = rng.uniform(0.04 * size, size - width - 0.04 * size)
    y0 = rng.uniform(0.02 * size, size - height - 0.02 * size)
    _draw_character(_Painter(rgb, labels, (x0, y0, width, height)), ch, 10)
    return rgb, np.asarray(labels)


# --------------------------------------------------------------------------- text


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


_HAIR_VERB = {"short hair": "neatly cut", "long hair": "falling past the shoulders",
              "twin-tails": "bouncing on both sides", "spiky hair": "sticking up"}


def _character_sentence(rng: random.Random, ch: Character, ref: str, position: str,
                        colours: bool = True) -> tuple[str, str]:
    """The subject's sentence, and the words in it that say where it stands (as they appear there)."""
    sentence = _sentence_of(rng, ch, ref, position, colours)
    return sentence, place_phrase(sentence, position)


def _sentence_of(rng: random.Random, ch: Character, ref: str, position: str, colours: bool) -> str:
    subj, poss, _ = ch.pronouns
    pos = rng.choice(_POSITION_WORDS[position])
    if not colours:  # the subject and its place only: what it wears can come from its reference alone
        return rng.choice((f"{ref} stands {pos}.", f"{_cap(pos)}, {ref} waves at the viewer.",
                           f"{ref} smiles {pos}."))
    hair, top, bottom = ch.hair_phrase, ch.top_phrase, ch.bottom_phrase
    templates = [
        f"{ref} stands {pos} in {_article(top)} and {bottom}, {poss} {hair} {_HAIR_VERB[ch.hair_style]}.",
        f"{_cap(pos)}, {ref} waves at the viewer, wearing {_article(top)} and {bottom}, "
        f"with {poss} {hair} {_HAIR_VERB[ch.hair_style]}.",
        f"{ref}, with {hair}, smiles {pos} in {_article(top)} and {bottom}.",
    ]
    if ch.hair_style in ("long hair", "twin-tails"):
        templates.append(f"{ref} stands {pos}, {poss} {hair} falling over {poss} {top} and {bottom}.")
    sentence = rng.choice(templates)
    acc = ch.accessory_phrase
    if acc is not None:
        verb = "wear" if subj == "they" else "wears"
        obj = acc if ch.accessory == "glasses" else _article(acc)
        sentence += f" {_cap(subj)} {rng.choice(('also ', ''))}{verb} {obj}."
    return sentence


def _phrases_of(ch: Character, ref: str, colours: bool = True) -> list[tuple[str, int]]:
    if not colours:
        return [(ref, 0)]
    out = [(ref, 0), (ch.hair_phrase, _HAIR), (ch.top_phrase, _TOP), (ch.bottom_phrase, _BOTTOM)]
    if ch.accessory_phrase is not None:
        out.append((ch.accessory_phrase, _ACC))
    return out


# --------------------------------------------------------------------------- public API


def _rng_for(split: str, index: int, seed: int) -> random.Random:
    digest = hashlib.sha256(f"cag-synthetic|{seed}|{split}|{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def generate_sample(split: str, index: int, cfg: SyntheticConfig) -> Sample:
    """One sample; the same (split, index, seed, size) always gives byte-identical images and text."""
    _check_split(split)
    cfg.check()
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"sample index {index!r} must be a non-negative int")
    rng = _rng_for(split, index, cfg.seed)
    lo, hi = cfg.character_range()
    n = rng.randint(lo, hi)
    cast = _choose_cast(rng, split, n, cfg.train_roster)
    layout = _layout(rng, cast, cfg)
    size = cfg.image_size
    scene_id = n + 1

    references: list[Image.Image] = []
    groundings: list[Grounding] = []
    subjects_truth: list[SubjectTruth] = []
    ref_phrases = [f"{ch.name} (Fig.{k + 1})" for k, ch in enumerate(cast)]
    ref_boxes: list[list[float]] = []
    for k, ch in enumerate(cast):
        img, lab = _render_reference(size, ch, rng)
        references.append(img)
        base = 10
        for phrase, part in _phrases_of(ch, ref_phrases[k], cfg.describe_colours):
            what = f"{split}-{index} reference {k + 1} {phrase!r}"
            box = _character_box(lab, base, what) if part == 0 else _part_box(lab, base, part, what)
            groundings.append(Grounding(phrase, k + 1, tuple(box)))  # type: ignore[arg-type]
        ref_boxes.append(_character_box(lab, base, f"{ref_phrases[k]} in its reference"))

    scene_img, scene_lab_img = _render_scene(size, layout)
    scene_lab = np.asarray(scene_lab_img)
    references.append(scene_img.copy())
    scene_phrase = rng.choice(("the background", f"the {layout.place}")) + f" (Fig.{scene_id})"
    groundings.append(Grounding(scene_phrase, scene_id, (0.0, 0.0, BOX_SCALE, BOX_SCALE)))
    props_truth: list[PropTruth] = []
    for j, prop in enumerate(layout.props):
        phrase = f"{prop.name} (Fig.{scene_id})"
        box = _label_bbox(scene_lab, lambda a, j=j: a == _PROP_LABEL + j, f"prop {prop.name!r}")
        groundings.append(Grounding(phrase, scene_id, tuple(box)))  # type: ignore[arg-type]
        props_truth.append(PropTruth(prop.name, phrase, _PROP_COLOURS[prop.colour_name], tuple(box), tuple(box)))  # type: ignore[arg-type]

    # target: the scene, then every character at its instructed place and size
    target = scene_img
    target_labels = scene_lab_img
    for k, pl in enumerate(layout.placements):
        x0, y0, x1, y1 = (v * size for v in pl.box)
        _draw_character(_Painter(target, target_labels, (x0, y0, x1 - x0, y1 - y0)), pl.character, 10 * (k + 1))
    tl = np.asarray(target_labels)
    for k, pl in enumerate(layout.placements):
        subjects_truth.append(SubjectTruth(
            name=pl.character.name,
            image_id=k + 1,
            phrase=ref_phrases[k],
            position=pl.position,
            target_bbox_2d=tuple(_character_box(tl, 10 * (k + 1), f"{ref_phrases[k]} in the target")),  # type: ignore[arg-type]
            reference_bbox_2d=tuple(ref_boxes[k]),  # type: ignore[arg-type]
            colors=dict(pl.character.colours()),
        ))

    # instruction
    sentences = [rng.choice(_SHOT_WORDS[layout.shot])]
    for k, pl in enumerate(layout.placements):
        sentence, place_words = _character_sentence(rng, pl.character, ref_phrases[k], pl.position,
                                                    cfg.describe_colours)
        sentences.append(sentence)
        if cfg.ground_places:  # the words that say where it stands point at the subject's reference too
            groundings.append(Grounding(place_words, k + 1, tuple(ref_boxes[k])))  # type: ignore[arg-type]
    if rng.random() < 0.4:  # a second mention, often possessive, as in the paper's instructions
        a = rng.randrange(n)
        ca = cast[a]
        if cfg.describe_colours:
            options = [f"{ref_phrases[a]}'s {ca.top_phrase} stands out against the {layout.place}."]
        else:
            options = [f"{ref_phrases[a]} looks straight at the viewer."]
        if n >= 2:
            b = rng.choice([k for k in range(n) if k != a])
            cb = cast[b]
            options += [f"{ref_phrases[a]} turns towards {ref_phrases[b]}."]
            if cfg.describe_colours:
                options += [
                    f"{ref_phrases[a]}'s {ca.top_phrase} contrasts with {ref_phrases[b]}'s {cb.bottom_phrase}.",
                    f"{ref_phrases[b]} smiles back at {ref_phrases[a]}, admiring {ca.pronouns[1]} {ca.hair_phrase}.",
                ]
            else:
                options += [f"{ref_phrases[b]} smiles back at {ref_phrases[a]}."]
        sentences.append(rng.choice(options))
    prop_list = " and ".join(_article(f"{p.name} (Fig.{scene_id})") for p in layout.props)
    them = "them" if n > 1 else cast[0].pronouns[2]
    if scene_phrase.startswith("the background"):
        sentences.append(rng.choice((
            f"Behind {them}, {scene_phrase} is {_article(layout.place)} with {prop_list}.",
            f"The scene takes place in front of {scene_phrase}, {_article(layout.place)} with {prop_list}.",
        )))
    else:
        sentences.append(rng.choice((
            f"The setting is {scene_phrase}, with {prop_list} nearby.",
            f"Behind {them} lies {scene_phrase}, where {prop_list} can be seen.",
        )))
    instruction = " ".join(sentences)

    sky, ground = _PLACES[layout.place]
    truth = Truth(
        image_size=(size, size),
        subjects=tuple(subjects_truth),
        scene=SceneTruth(scene_id, {"sky": sky, "ground": ground}, tuple(props_truth)),
    )
    sample = Sample(
        key=f"{split}-{index:06d}",
        references=references,
        instruction=instruction,
        groundings=groundings,
        target=target,
        task_type="scene_single_character" if n == 1 else "scene_multi_character",
        truth=truth,
    )
    sample.validate()
    return sample


def generate_split(split: str, n: int, cfg: SyntheticConfig) -> Iterator[Sample]:
    """Samples ``0 .. n-1`` of a split, lazily, so large splits stream straight into the shard writer."""
    _check_split(split)
    cfg.check()
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"number of samples n={n!r} must be a non-negative int")
    for index in range(n):
        yield generate_sample(split, index, cfg)
