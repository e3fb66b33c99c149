"""DINO / CLIP-I / CLIP-T metrics, run through the real loaders with tiny randomly initialised models.

Random weights cannot tell us what a real DINO thinks, but cosine similarity has answers
that hold for any weights (identical images give 1, a clamp gives >= 0, a mean over two
references is the mean of the two single-reference scores), and those are what is tested.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torchmetrics.utilities.data import dim_zero_sum

from evaluation.metrics import (
    CLIPImageScore,
    CLIPTextScore,
    DINOScore,
    MetricUnavailable,
    build_metrics,
    dino_transform,
    load_clip,
    load_dino,
)

TINY_CLIP = "cag-test-tiny-clip"


def _image(seed: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    path = tmp_path_factory.mktemp("dino")
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Register a tiny open_clip architecture and save random weights for it as safetensors."""
    root = tmp_path_factory.mktemp("clip")
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1},
    }
    (root / f"{TINY_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP)
    path = root / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def dino(dino_dir: Path):
    return load_dino(str(dino_dir))


@pytest.fixture(scope="module")
def clip(clip_weights: Path):
    return load_clip(TINY_CLIP, str(clip_weights))


def test_dino_identical_image_scores_one_and_different_image_less(dino) -> None:
    metric = DINOScore(dino)
    a, b = _image(1), _image(2)
    scores = metric.score_sample([a, a], [[a.copy()], [b]])
    assert scores[0].item() == pytest.approx(1.0, abs=1e-5)
    assert scores[1].item() < 0.9999


def test_clip_image_identical_image_scores_one_and_different_image_less(clip) -> None:
    metric = CLIPImageScore(clip)
    a, b = _image(3), _image(4)
    scores = metric.score_sample([a, a], [[a.copy()], [b]])
    assert scores[0].item() == pytest.approx(1.0, abs=1e-5)
    assert scores[1].item() < 0.9999


def test_clip_text_is_raw_cosine_clamped_at_zero(clip) -> None:
    metric = CLIPTextScore(clip)
    images = [_image(s) for s in range(6)]
    prompts = ["a red bench in a park", "Rin (Fig.1) stands left", "x", "blue sky", "two people", "night"]
    scores = metric.score_sample(images, prompts=prompts)
    # recompute the unclamped cosine independently through open_clip
    with torch.no_grad():
        img = torch.stack([clip.preprocess(im) for im in images])
        ie = torch.nn.functional.normalize(clip.model.encode_image(img), dim=-1)
        te = torch.nn.functional.normalize(clip.model.encode_text(clip.tokenizer(prompts)), dim=-1)
    raw = (ie * te).sum(-1)
    assert torch.allclose(scores, raw.clamp(min=0), atol=1e-5)
    assert (scores >= 0).all() and (scores <= 1.0 + 1e-6).all()  # never x100


def test_clip_text_clamps_negative_cosine_to_exactly_zero(clip) -> None:
    metric = CLIPTextScore(clip)
    # search a few prompt/image pairs for a negative raw cosine (random weights give both signs)
    images = [_image(s) for s in range(20)]
    prompts = [f"prompt number {s}" for s in range(20)]
    with torch.no_grad():
        ie = torch.nn.functional.normalize(
            clip.model.encode_image(torch.stack([clip.preprocess(im) for im in images])), dim=-1
        )
        te = torch.nn.functional.normalize(clip.model.encode_text(clip.tokenizer(prompts)), dim=-1)
    raw = (ie * te).sum(-1)
    negative = [i for i in range(20) if raw[i] < 0]
    assert negative, "tiny random CLIP produced no negative cosine; change seeds"
    scores = metric.score_sample([images[i] for i in negative], prompts=[prompts[i] for i in negative])
    assert torch.equal(scores, torch.zeros(len(negative)))


def test_dino_averages_over_references(dino) -> None:
    metric = DINOScore(dino)
    gen, other = _image(5), _image(6)
    single = metric.score_sample([gen], [[other]])[0].item()
    both = metric.score_sample([gen], [[gen.copy(), other]])[0].item()
    assert both == pytest.approx((1.0 + single) / 2, abs=1e-5)


def test_clip_image_averages_over_references_and_can_drop_the_scene(clip) -> None:
    gen, scene = _image(7), _image(8)
    with_scene = CLIPImageScore(clip, include_scene=True)
    single = with_scene.score_sample([gen], [[scene]])[0].item()
    assert with_scene.score_sample([gen], [[gen.copy(), scene]])[0].item() == pytest.approx(
        (1 + single) / 2, abs=1e-5
    )
    subjects_only = CLIPImageScore(clip, include_scene=False)
    assert subjects_only.score_sample([gen], [[gen.copy(), scene]])[0].item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="none is left"):
        subjects_only.score_sample([gen], [[scene]])


def test_reduction_over_two_updates_equals_mean_of_per_sample_values(dino) -> None:
    metric = DINOScore(dino, batch_size=2)  # batch smaller than the update: exercises chunking
    imgs = [_image(s) for s in range(10, 15)]
    per_sample: list[float] = []
    metric.update(imgs[:2], [[imgs[2], imgs[3]], [imgs[4]]])
    per_sample += metric.last_values
    metric.update(imgs[2:5], [[imgs[0]], [imgs[1], imgs[0]], [imgs[4].copy()]])
    per_sample += metric.last_values
    assert len(per_sample) == 5
    assert per_sample[-1] == pytest.approx(1.0, abs=1e-5)
    assert metric.compute().item() == pytest.approx(sum(per_sample) / 5, abs=1e-6)
    assert metric.count.item() == 5
    # states are declared as sums, so a multi-rank reduction is sum(total) / sum(count)
    assert metric._reductions["total"] is dim_zero_sum and metric._reductions["count"] is dim_zero_sum


def test_two_metric_copies_merged_like_ranks_give_the_global_mean(clip) -> None:
    imgs = [_image(s) for s in range(20, 24)]
    prompts = ["a", "b c", "d e f", "g"]
    rank0, rank1, single = CLIPTextScore(clip), CLIPTextScore(clip), CLIPTextScore(clip)
    rank0.update(imgs[:1], prompts=prompts[:1])
    rank1.update(imgs[1:], prompts=prompts[1:])
    single.update(imgs, prompts=prompts)
    rank0.merge_state(rank1)  # the same sum reduction torchmetrics applies across ranks
    assert rank0.compute().item() == pytest.approx(single.compute().item(), abs=1e-6)


def test_dino_transform_is_resize_256_bicubic_then_center_crop_224() -> None:
    from torchvision import transforms

    tf = dino_transform(224)
    resize = next(t for t in tf.transforms if isinstance(t, transforms.Resize))
    crop = next(t for t in tf.transforms if isinstance(t, transforms.CenterCrop))
    assert resize.size == 256 and resize.interpolation == transforms.InterpolationMode.BICUBIC
    assert tuple(crop.size) == (224, 224)
    out = tf(Image.new("L", (512, 300), 128))  # grey, non-square, non-RGB input
    assert out.shape == (3, 224, 224)
    expected = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(out[:, 100, 100], expected, atol=1e-4)


def test_backbone_stays_out_of_checkpoints_and_parameters(dino) -> None:
    """A metric attached to a LightningModule must not add frozen DINO weights to its checkpoint or optimizer."""
    metric = DINOScore(dino)
    metric.persistent(True)
    assert set(metric.state_dict()) == {"total", "count"}
    assert list(metric.parameters()) == []
    assert metric.model is dino.model


def test_missing_dino_directory_raises_metric_unavailable_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dino"
    with pytest.raises(MetricUnavailable, match="no_such_dino"):
        load_dino(str(missing))


def test_uncached_dino_hub_id_raises_metric_unavailable_without_network() -> None:
    with pytest.raises(MetricUnavailable, match="cag-tests/not-a-cached-model"):
        load_dino("cag-tests/not-a-cached-model")


def test_missing_clip_file_raises_metric_unavailable_naming_it(tmp_path: Path, clip_weights: Path) -> None:
    missing = tmp_path / "absent_clip.safetensors"
    with pytest.raises(MetricUnavailable, match="absent_clip.safetensors"):
        load_clip(TINY_CLIP, str(missing))


def test_uncached_clip_tag_raises_metric_unavailable_quickly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    start = time.monotonic()
    with pytest.raises(MetricUnavailable, match="openai"):
        load_clip("ViT-B-32-quickgelu", "openai")
    assert time.monotonic() - start < 5.0  # no download retries


def test_clip_tag_is_resolved_from_the_local_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An 'openai' tag already downloaded once is found on disk, so load_clip never touches the network."""
    import huggingface_hub.constants as hub_constants

    from evaluation.metrics import _cached_open_clip_file

    repo = tmp_path / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"placeholder")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    found = _cached_open_clip_file("ViT-B-32-quickgelu", "openai")
    assert found is not None and Path(found) == snapshot / "open_clip_model.safetensors"


def test_clip_without_weights_is_refused() -> None:
    with pytest.raises(MetricUnavailable, match="pretrained=None"):
        load_clip("ViT-B-32-quickgelu", None)


def test_build_metrics_skips_what_is_missing_and_builds_the_rest(dino_dir: Path, tmp_path: Path) -> None:
    cfg = {
        "dino": {"source": str(dino_dir)},
        "clip": {"model_name": TINY_CLIP, "pretrained": str(tmp_path / "gone.safetensors")},
    }
    metrics, skipped = build_metrics(cfg)
    assert set(metrics) == {"dino"}
    assert set(skipped) == {"clip_i", "clip_t"}
    assert "gone.safetensors" in skipped["clip_i"]
    a = _image(30)
    metrics["dino"].update([a], [[a.copy()]])
    assert math.isclose(metrics["dino"].compute().item(), 1.0, abs_tol=1e-5)


def test_missing_weights_are_one_line_each_saying_how_to_provide_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Not the hub library's multi-line 'could not connect' text: the config key to set, or how to cache."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    cfg = {"dino": {"source": "cag-tests/not-a-cached-model"},
           "clip": {"model_name": "ViT-B-32-quickgelu", "pretrained": "openai"}}
    with caplog.at_level("WARNING", logger="evaluation.metrics"):
        metrics, skipped = build_metrics(cfg)
    assert metrics == {}
    assert "metrics.dino.source=" in skipped["dino"] and "metrics.clip.pretrained=" in skipped["clip_i"]
    assert all("\n" not in reason and len(reason) < 240 for reason in skipped.values())
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 2 and all("\n" not in line for line in lines)


def test_build_metrics_shares_one_clip_model(clip_weights: Path) -> None:
    metrics, skipped = build_metrics(
        {"metrics": ["clip_i", "clip_t"], "clip": {"model_name": TINY_CLIP, "pretrained": str(clip_weights)}}
    )
    assert skipped == {}
    assert metrics["clip_i"].model is metrics["clip_t"].model


def test_build_metrics_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="fid"):
        build_metrics({"metrics": ["fid"]})
