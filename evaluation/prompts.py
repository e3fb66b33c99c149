"""Judge prompts for Prompt Following (PF) and Subject Consistency (SC).

The structure follows docs/design.md, 'Judge metrics' (shared header, then one rubric
per criterion, one call per criterion); the wording is ours. Both rubrics ask for a single JSON object so
that the answer can be checked mechanically and a non-answer retried instead of guessed.
Changing any text here changes the cache key of every judge call, which is intended: a
new prompt is a new measurement.
"""

from __future__ import annotations

PROMPT_VERSION = "cag-judge-v1"

HEADER = """You are an expert evaluator of AI-generated images. You will be given an editing \
or generation instruction, one or more reference images labelled "Fig. 1", "Fig. 2", ..., and \
finally the image that a model generated from them. Judge only the criterion described below, \
be strict and consistent, and base the score on what is visible in the generated image.

Reply with exactly one JSON object and nothing else, in this form:
{"score": <number from 0 to 10>, "reasoning": "<one or two sentences>"}"""

PF_RUBRIC = """Criterion: PROMPT FOLLOWING.
Decide how completely the generated image carries out the instruction. Check every \
requirement it states: which subjects appear and how many, their composition and relative \
positions, poses and actions, interactions between subjects, the viewpoint or framing, and \
the requested setting. Do NOT judge whether people or objects look like their references; \
identity is scored separately. A missing subject, a wrong action or a wrong arrangement \
each lower the score.

Scale: 10 = every requirement is met; 7-9 = small omissions or inaccuracies; 4-6 = about \
half of the requirements are met; 1-3 = the image barely relates to the instruction; \
0 = unrelated to the instruction or no usable image."""

SC_RUBRIC = """Criterion: SUBJECT CONSISTENCY.
For every subject that the instruction takes from a reference image, compare it with that \
reference and decide whether it is recognisably the same individual or object: face and \
facial features, hair style and colour, body shape, clothing, and accessories. {scene_rule} \
Start from 10 and deduct for every difference you can see, more for identity-defining \
features (face, hair colour) than for small details; a subject that is missing or replaced \
by someone else costs the most. Ignore whether the pose, position or action matches the \
instruction; that is scored separately.

Scale: 10 = every subject (and the scene, if given) is faithfully preserved; 7-9 = minor \
deviations; 4-6 = some subjects are clearly altered; 1-3 = most identities are lost; \
0 = none of the references is recognisable."""

SCENE_RULE_GENERIC = (
    "If one of the references shows a scene or background rather than a subject, the "
    "generated image should also keep that scene's layout, objects and style."
)
SCENE_RULE_INDEXED = (
    "Fig. {k} is the scene reference: the generated image should also keep that scene's "
    "layout, objects and style."
)

INSTRUCTION_LABEL = "Instruction:"
REFERENCE_LABEL = "Fig. {k}:"
GENERATED_LABEL = "Generated image (evaluate this one):"

CRITERIA = ("PF", "SC")


def rubric(criterion: str, scene_ref: int | None = None) -> str:
    """Criterion-specific part of the system prompt; ``scene_ref`` is the 1-based Fig. number
    of the scene reference when the data says which one it is."""
    if criterion == "PF":
        return PF_RUBRIC
    if criterion == "SC":
        scene = SCENE_RULE_GENERIC if scene_ref is None else SCENE_RULE_INDEXED.format(k=scene_ref)
        return SC_RUBRIC.format(scene_rule=scene)
    raise ValueError(f"unknown criterion {criterion!r}; expected one of {CRITERIA}")


def system_prompt(criterion: str, scene_ref: int | None = None) -> str:
    return f"{HEADER}\n\n{rubric(criterion, scene_ref)}"
