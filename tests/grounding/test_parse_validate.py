"""Parsing of free-text VLM answers, coordinate conversion and item validation (no model, no server)."""

from __future__ import annotations

import time

import pytest
from PIL import Image

from cag.data.sample import Grounding
from cag.grounding import (
    AnswerParseError,
    GroundingRequest,
    OpenAIBackend,
    PromptTemplates,
    check_boxes,
    check_phrases,
    parse_box_list,
    parse_image_id,
    parse_phrase_list,
    smart_resize,
    to_relative1000,
)
from cag.grounding.prompts import BOXES_TEMPLATE_FILE, PHRASES_TEMPLATE_FILE, default_template_dir

INSTRUCTION = (
    "Tracking shot. Kazama Che (Fig.1) dribbles past Akai Kenji (Fig.2)'s defense, the sleeves of his "
    "black leather jacket rolled up. The background is the basketball hoop (Fig.3)."
)


# ----------------------------------------------------------------------------- stage-1 parsing


def test_phrase_list_python_literal_with_single_quotes_as_in_fig7() -> None:
    raw = "['Kazama Che (Fig.1)', 'Akai Kenji (Fig.2)', 'black leather jacket']"
    assert parse_phrase_list(raw) == ["Kazama Che (Fig.1)", "Akai Kenji (Fig.2)", "black leather jacket"]


def test_phrase_list_inside_code_fence_with_trailing_comma() -> None:
    raw = 'Here you go:\n```json\n["Kazama Che (Fig.1)", "black leather jacket",]\n```\n'
    assert parse_phrase_list(raw) == ["Kazama Che (Fig.1)", "black leather jacket"]


def test_phrase_list_wrapped_in_prose_skips_bracketed_numbers_before_it() -> None:
    raw = "Looking at image [1] and the text, the names are ['Kazama Che (Fig.1)', 'bandage',] — hope this helps!"
    assert parse_phrase_list(raw) == ["Kazama Che (Fig.1)", "bandage"]


def test_phrase_list_keeps_apostrophes_inside_double_quoted_items() -> None:
    raw = "[\"Akai Kenji (Fig.2)'s defense\", 'Kazama Che (Fig.1)']"
    assert parse_phrase_list(raw) == ["Akai Kenji (Fig.2)'s defense", "Kazama Che (Fig.1)"]


def test_phrase_list_without_any_list_raises_value_error_so_the_client_retries() -> None:
    with pytest.raises(AnswerParseError) as exc:
        parse_phrase_list("The names are Kazama Che and Akai Kenji.")
    assert isinstance(exc.value, ValueError)
    assert "no list of phrases" in str(exc.value)


def test_garbage_with_many_brackets_is_rejected_quickly() -> None:
    garbage = "[{ 'a, [b } ]] {[ c" * 400
    start = time.perf_counter()
    with pytest.raises(AnswerParseError):
        parse_box_list(garbage)
    assert time.perf_counter() - start < 5.0


# ----------------------------------------------------------------------------- stage-2 parsing


def test_box_list_in_fence_as_in_fig9() -> None:
    raw = (
        "```json\n[\n"
        '  {"image_id": "1", "bbox_2d": [300, 14, 655, 987], "label": "Kazama Che (Fig.1)"},\n'
        '  {"image_id": "2", "bbox_2d": [311, 24, 643, 973], "label": "Akai Kenji (Fig.2)"},\n'
        "]\n```"
    )
    items = parse_box_list(raw)
    assert [i["label"] for i in items] == ["Kazama Che (Fig.1)", "Akai Kenji (Fig.2)"]
    assert items[0]["bbox_2d"] == [300, 14, 655, 987]


def test_box_list_from_bare_objects_and_wrapped_object() -> None:
    bare = 'A: {"image_id": 1, "bbox_2d": [1, 2, 3, 4], "label": "x"}\nB: {"image_id": 2, "bbox_2d": [5, 6, 7, 8], "label": "y"}'
    assert [i["label"] for i in parse_box_list(bare)] == ["x", "y"]
    wrapped = '{"objects": [{"image_id": 1, "bbox_2d": [1, 2, 3, 4], "label": "x"}]}'
    assert parse_box_list(wrapped) == [{"image_id": 1, "bbox_2d": [1, 2, 3, 4], "label": "x"}]


def test_box_list_python_literal_single_quotes_and_trailing_commas() -> None:
    raw = "[{'image_id': 'Fig.2', 'bbox_2d': [1, 2, 3, 4,], 'label': 'bandage',},]"
    assert parse_box_list(raw) == [{"image_id": "Fig.2", "bbox_2d": [1, 2, 3, 4], "label": "bandage"}]


# ----------------------------------------------------------------------------- image ids and coordinates


@pytest.mark.parametrize("value", [2, "2", 2.0, "Fig.2", "Fig. 2", "fig 2", "image 2", " 2 ", "Figure 2"])
def test_image_id_forms_accepted(value: object) -> None:
    assert parse_image_id(value) == 2


@pytest.mark.parametrize("value", ["1,2,3,...", "two", True, None, [2], 2.5, "Fig.2b"])
def test_image_id_forms_rejected(value: object) -> None:
    with pytest.raises(ValueError):
        parse_image_id(value)


def test_absolute_pixels_of_resized_image_convert_to_relative_1000() -> None:
    # A 1000x700 reference becomes 1008x700 in Qwen2.5-VL's processor; boxes are in those pixels.
    h, w = smart_resize(700, 1000)
    assert (w, h) == (1008, 700)
    box = to_relative1000([252, 175, 756, 700], "absolute", (w, h))
    assert box == pytest.approx((250.0, 250.0, 750.0, 1000.0))


def test_relative_and_normalized_coordinates_and_clamping() -> None:
    assert to_relative1000([300, 14, 655, 987], "relative1000") == (300.0, 14.0, 655.0, 987.0)
    assert to_relative1000([0.25, 0.5, 0.75, 1.0], "normalized") == (250.0, 500.0, 750.0, 1000.0)
    assert to_relative1000([-20, 5, 1200, 1001], "relative1000") == (0.0, 5.0, 1000.0, 1000.0)
    assert to_relative1000(["10", "20", "30", "40"], "relative1000") == (10.0, 20.0, 30.0, 40.0)


@pytest.mark.parametrize(
    "box", [[1, 2, 3], [1, 2, 3, 4, 5], ["a", 2, 3, 4], [1, 2, float("nan"), 4], "1,2,3,4"]
)
def test_malformed_boxes_raise(box: object) -> None:
    with pytest.raises(ValueError):
        to_relative1000(box, "relative1000")  # type: ignore[arg-type]


def test_absolute_without_image_size_is_an_error_not_a_guess() -> None:
    with pytest.raises(ValueError, match="model-input size"):
        to_relative1000([1, 2, 3, 4], "absolute", None)


def test_own_smart_resize_matches_transformers_qwen2_vl_processor() -> None:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_resize

    for h, w in [(700, 1000), (64, 64), (20, 300), (4000, 3000), (129, 77), (1080, 1920), (30, 30)]:
        for lo, hi in [(3136, 12845056), (3136, 1003520), (1024, 4096)]:
            assert smart_resize(h, w, 28, lo, hi) == hf_resize(h, w, 28, lo, hi), (h, w, lo, hi)


def test_openai_backend_reports_the_size_the_served_model_sees_after_upload_downscale() -> None:
    backend = OpenAIBackend(
        "m", base_url="http://127.0.0.1:9/v1", coords="absolute", max_image_pixels=250_000
    )
    sizes = backend.model_image_sizes([Image.new("RGB", (1000, 1000)), Image.new("RGB", (200, 100))])
    # 1000x1000 is uploaded as 500x500, which the processor turns into 504x504.
    assert sizes == [(504, 504), (196, 112)]


# ----------------------------------------------------------------------------- item validation


def test_phrase_must_occur_verbatim_else_rejected_with_reason() -> None:
    check = check_phrases(
        ["Kazama Che (Fig.1)", "kazama che (fig.1)", "red scarf", 7, "  ", "Kazama Che (Fig.1)", " bandage"],
        INSTRUCTION + " A bandage.",
    )
    assert check.phrases == ["Kazama Che (Fig.1)", "bandage"]
    reasons = [r.reason for r in check.rejections]
    assert reasons == [
        "phrase_not_in_instruction",
        "phrase_not_in_instruction",
        "not_a_string",
        "empty_phrase",
    ]
    assert "red scarf" in check.rejections[1].detail


def test_boxes_validated_converted_merged_and_missing_phrases_reported() -> None:
    items = [
        {"image_id": "1", "bbox_2d": [300, 14, 655, 987], "label": "Kazama Che (Fig.1)"},
        {"image_id": 1, "bbox_2d": [300, 14, 655, 987], "label": "Kazama Che (Fig.1)"},  # duplicate
        {"image_id": "Fig.1", "bbox_2d": [323, 163, 655, 555], "label": "black leather jacket"},
        {"image_id": "4", "bbox_2d": [1, 2, 3, 4], "label": "basketball hoop (Fig.3)"},  # only 3 references
        {"image_id": "2", "bbox_2d": [500, 500, 400, 900], "label": "Akai Kenji (Fig.2)"},  # x2 < x1
        {
            "image_id": "2",
            "bbox_2d": [1100, 10, 1300, 20],
            "label": "Akai Kenji (Fig.2)",
        },  # clamps to zero width
        {"image_id": "2", "bbox_2d": [1, 2, 3], "label": "Akai Kenji (Fig.2)"},
        {"image_id": "2", "bbox_2d": [1, 2, 3, 4], "label": "green scarf"},
        {"bbox_2d": [1, 2, 3, 4], "label": "Akai Kenji (Fig.2)"},
        {"image_id": "2", "bbox_2d": [1, 2, 3, 4]},
        "not an object",
    ]
    phrases = ["Kazama Che (Fig.1)", "Akai Kenji (Fig.2)", "black leather jacket", "basketball hoop (Fig.3)"]
    check = check_boxes(items, INSTRUCTION, 3, "relative1000", None, phrases)
    assert check.groundings == [
        Grounding("Kazama Che (Fig.1)", 1, (300.0, 14.0, 655.0, 987.0)),
        Grounding("black leather jacket", 1, (323.0, 163.0, 655.0, 555.0)),
    ]
    assert check.merged == 1
    assert [r.reason for r in check.rejections] == [
        "image_id_out_of_range",
        "degenerate_bbox",
        "degenerate_bbox",
        "bad_bbox",
        "label_not_in_instruction",
        "missing_image_id",
        "missing_label",
        "not_an_object",
        "phrase_not_located",
        "phrase_not_located",
    ]
    assert "outside 1..3" in check.rejections[0].detail


def test_absolute_boxes_use_each_reference_own_size() -> None:
    items = [
        {"image_id": 1, "bbox_2d": [0, 0, 56, 28], "label": "Kazama Che (Fig.1)"},
        {"image_id": 2, "bbox_2d": [0, 0, 56, 28], "label": "Akai Kenji (Fig.2)"},
    ]
    check = check_boxes(items, INSTRUCTION, 2, "absolute", [(112, 56), (56, 112)])
    assert [g.bbox_2d for g in check.groundings] == [(0.0, 0.0, 500.0, 500.0), (0.0, 0.0, 1000.0, 250.0)]


# ----------------------------------------------------------------------------- templates and messages


def test_templates_keep_the_paper_wording_and_fill_their_slots() -> None:
    t = PromptTemplates.load()
    assert "Preserve the exact wording of each character or clothing name" in t.phrases
    assert "Draw a bounding box around the location of each object in the list" in t.boxes
    stage1 = t.render_phrases(INSTRUCTION)
    assert stage1.endswith(INSTRUCTION) and "<Instruction>" not in stage1
    stage2 = t.render_boxes(["Kazama Che (Fig.1)", "Akai Kenji (Fig.2)'s"])
    assert stage2.endswith('["Kazama Che (Fig.1)", "Akai Kenji (Fig.2)\'s"]')


def test_editing_a_template_changes_the_cache_digest(tmp_path) -> None:
    base = default_template_dir()
    edited = tmp_path / "p.txt"
    edited.write_text((base / PHRASES_TEMPLATE_FILE).read_text() + "\nAnswer in JSON.", encoding="utf-8")
    assert PromptTemplates.load(edited, base / BOXES_TEMPLATE_FILE).digest != PromptTemplates.load().digest
    broken = tmp_path / "b.txt"
    broken.write_text("no slot here", encoding="utf-8")
    with pytest.raises(ValueError, match="placeholder"):
        PromptTemplates.load(base / PHRASES_TEMPLATE_FILE, broken)


def test_openai_messages_put_one_image_part_per_reference_before_the_text() -> None:
    backend = OpenAIBackend("m", base_url="http://127.0.0.1:9/v1")
    refs = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    msgs = backend.messages(GroundingRequest("k", "phrases", "PROMPT", refs))
    parts = msgs[0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "image_url", "text"]
    assert all(p["image_url"]["url"].startswith("data:image/png;base64,") for p in parts[:3])
    assert parts[3]["text"] == "PROMPT"
