"""Instruction-reference alignment (paper Sec. 3.3, App. A): phrases of the instruction and their boxes.

Stage 1 asks a VLM which phrases of the instruction name something in the references
(Fig. 7 prompt), stage 2 asks for each phrase's reference and box (Fig. 8 prompt). The
result is the ``groundings`` list every sample carries into training.
"""

from cag.grounding.backends import (
    Answer,
    GroundingBackend,
    GroundingRequest,
    LocalBackend,
    OpenAIBackend,
    OracleBackend,
    build_backend,
    smart_resize,
)
from cag.grounding.parse import AnswerParseError, parse_box_list, parse_phrase_list
from cag.grounding.pipeline import GroundingPipeline, ResultStore, SampleResult, apply_groundings
from cag.grounding.prompts import PromptTemplates, default_template_dir
from cag.grounding.report import build_report, format_table, log_to_mlflow, write_report
from cag.grounding.validate import (
    BoxCheck,
    PhraseCheck,
    Rejection,
    check_boxes,
    check_phrases,
    parse_image_id,
    to_relative1000,
)
from cag.grounding.viz import draw_alignment, save_alignment

__all__ = [
    "Answer",
    "AnswerParseError",
    "BoxCheck",
    "GroundingBackend",
    "GroundingPipeline",
    "GroundingRequest",
    "LocalBackend",
    "OpenAIBackend",
    "OracleBackend",
    "PhraseCheck",
    "PromptTemplates",
    "Rejection",
    "ResultStore",
    "SampleResult",
    "apply_groundings",
    "build_backend",
    "build_report",
    "check_boxes",
    "check_phrases",
    "default_template_dir",
    "draw_alignment",
    "format_table",
    "log_to_mlflow",
    "parse_box_list",
    "parse_image_id",
    "parse_phrase_list",
    "save_alignment",
    "smart_resize",
    "to_relative1000",
    "write_report",
]
