"""The in-process transformers backend, end to end, with the platform's tiny randomly initialised Qwen2.5-VL."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cag.data.synthetic import SyntheticConfig, generate_split
from cag.grounding import (
    GroundingPipeline,
    GroundingRequest,
    LocalBackend,
    PromptTemplates,
    build_backend,
    build_report,
)

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture(scope="module")
def tiny_backend() -> LocalBackend:
    from cag.models.vlm import build_vlm

    model_cfg = OmegaConf.load(CONF / "model" / "tiny.yaml")
    vlm, processor = build_vlm(model_cfg.vlm, seed=0)
    return LocalBackend(
        vlm, processor, model_id="tiny-qwen2.5-vl", coords="absolute", batch_size=2, max_new_tokens=12
    )


@pytest.fixture(scope="module")
def samples():
    return list(generate_split("test", 3, SyntheticConfig(image_size=64, num_characters=[1, 3], seed=0)))


def test_prompt_places_one_image_block_per_reference_before_the_instruction(tiny_backend, samples) -> None:
    sample = samples[0]
    templates = PromptTemplates.load()
    req = GroundingRequest(
        "k", "phrases", templates.render_phrases(sample.instruction), sample.references, sample
    )
    prompt = tiny_backend.processor.apply_chat_template(
        tiny_backend._messages(req),
        chat_template=tiny_backend.chat_template,
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt.count("<|vision_start|>") == len(sample.references)
    assert prompt.rindex("<|vision_end|>") < prompt.index("Your task is to identify")
    assert prompt.rstrip().endswith("<|im_start|>assistant")


def test_model_image_sizes_are_read_from_the_processor_resize(tiny_backend, samples) -> None:
    sizes = tiny_backend.model_image_sizes(samples[0].references)
    feats = tiny_backend.processor.image_processor(images=samples[0].references, return_tensors="pt")
    patch = tiny_backend.processor.image_processor.patch_size
    assert sizes == [(int(w) * patch, int(h) * patch) for _, h, w in feats["image_grid_thw"].tolist()]


def test_garbage_answers_of_a_random_vlm_are_rejected_cleanly_with_reasons(
    tmp_path, tiny_backend, samples
) -> None:
    pipe = GroundingPipeline(tiny_backend, PromptTemplates.load(), tmp_path / "results.jsonl", chunk_size=8)
    before = tiny_backend.calls_made
    results = pipe.run(samples)
    assert tiny_backend.calls_made - before >= len(samples)  # batched: 3 requests in batches of 2
    assert set(results) == {s.key for s in samples}
    for s in samples:
        r = results[s.key]
        assert r.groundings == [] and r.status == "none"
        assert r.rejections, "an ungrounded sample must say why"
        assert r.raw.get("phrases"), "the model's raw answer is kept for inspection"
        assert all(rej.reason and rej.detail for rej in r.rejections)
    report = build_report(results.values())
    assert report["not_grounded"] == len(samples) and report["rejections_total"] >= len(samples)
    # Rerun: everything comes from the results file, the model is not run again.
    calls = tiny_backend.calls_made
    GroundingPipeline(tiny_backend, PromptTemplates.load(), tmp_path / "results.jsonl").run(samples)
    assert tiny_backend.calls_made == calls


def test_batched_generation_matches_one_by_one_so_padding_does_not_leak_into_answers(
    tiny_backend, samples
) -> None:
    templates = PromptTemplates.load()
    reqs = [
        GroundingRequest(s.key, "phrases", templates.render_phrases(s.instruction), s.references, s)
        for s in samples
    ]
    # samples 0 and 1 have different numbers of references, hence different prompt lengths.
    assert len(samples[0].references) != len(samples[1].references)
    batched = tiny_backend._generate(reqs[:2])
    single = [tiny_backend._generate([r])[0] for r in reqs[:2]]
    assert batched == single  # also shows greedy decoding: the same prompt gives the same text


def test_checkpoint_directory_loads_through_auto_classes_and_answers_like_the_original(
    tmp_path, tiny_backend, samples
) -> None:
    """``grounding=local grounding.model=<dir>``: the path a real Qwen2.5-VL checkpoint takes."""
    from hydra import compose, initialize_config_dir

    tiny_backend.model.save_pretrained(tmp_path / "ckpt")
    tiny_backend.processor.save_pretrained(tmp_path / "ckpt")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="ground",
            overrides=[
                "grounding=local",
                f"grounding.model={tmp_path / 'ckpt'}",
                "grounding.max_new_tokens=12",
            ],
        )
    loaded = build_backend(cfg.grounding)
    assert (
        isinstance(loaded, LocalBackend)
        and type(loaded.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    )
    assert loaded.model_id == str(tmp_path / "ckpt") and loaded.coords == "absolute"
    templates = PromptTemplates.load()
    req = GroundingRequest(
        "k", "phrases", templates.render_phrases(samples[1].instruction), samples[1].references
    )
    assert loaded._generate([req]) == tiny_backend._generate([req])


def test_default_local_config_builds_the_platform_tiny_vlm() -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="ground", overrides=["grounding=local"])
    backend = build_backend(cfg.grounding)
    assert isinstance(backend, LocalBackend)
    assert backend.model_id == "tiny-qwen2.5-vl"
    assert backend.processor.tokenizer.padding_side == "left"
