"""Text-to-reference attention maps (paper Sec. 4.4.2, Fig. 6).

For one grounded phrase (e.g. "Rin (Fig.1)") we want to see where its tokens look in the
reference images' latent tokens, under full and under masked attention. The recorder is a
:class:`CAGAttnProcessor` whose ``attend`` first recomputes, for the phrase's query rows
only, ``softmax(q k^T / sqrt(d))`` with **the same mask the layer applies** (padding for
full attention; the phrase rows' eq. 9 mask for masked attention), then runs the normal
attention unchanged, so recording never alters the image. Probabilities are averaged over
heads, the chosen layers, the conditional passes of all sampling steps and the phrase's
tokens (every occurrence), and each reference's slice is reshaped to its token grid.

Under masked attention a phrase row cannot see outside its box, so its map is exactly
zero there; a row's total mass on reference tokens is at most 1 (the rest goes to text
and target tokens).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import open_dict
from PIL import Image

from cag.checkpoints import resolve_checkpoint
from cag.data.batching import collate, to_image
from cag.data.sample import BOX_SCALE, Sample
from cag.generate import load_model_for_inference, samples_from_config
from cag.models.attention import ATTENTION_MODES, CAGAttnProcessor, PhraseRowMask
from cag.models.cag_model import CAGModel, Conditioning
from cag.models.layout import box_to_token_indices
from cag.sampling import SamplerConfig, sample_batch

MODE_TITLES = {"full": "Full Attn.", "masked": "Mask Attn.", "routed": "Routed Attn."}


def phrase_probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    rows: Sequence[int],
    padding_mask: torch.Tensor | None,
    cag_mask: PhraseRowMask | None,
    sample: int = 0,
) -> torch.Tensor:
    """Attention probabilities ``[H, R, L]`` of joint rows ``rows`` of one sample, under the layer's own mask.

    ``query``/``key``: ``[B, L, H, D]`` as :meth:`CAGAttnProcessor.attend` receives them.
    With ``cag_mask`` (masked or routed attention) every row uses the key mask that mask gives
    it (a phrase row its eq. 9 keys); without it, the key-padding mask of full attention.
    """
    length = key.shape[1]
    allowed = torch.ones(len(rows), length, dtype=torch.bool, device=key.device)
    if padding_mask is not None:
        allowed &= padding_mask[sample].reshape(-1)[None, :].bool()
    if cag_mask is not None:
        allowed = cag_mask.row_keys(sample, list(rows)).to(key.device)
    idx = torch.as_tensor(list(rows), dtype=torch.long, device=query.device)
    q = query[sample, idx].float()  # [R, H, D]
    k = key[sample].float()  # [L, H, D]
    logits = torch.einsum("rhd,lhd->hrl", q, k) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~allowed[None], float("-inf"))
    return logits.softmax(dim=-1)


@dataclass
class PhraseAttention:
    """Averaged attention of one phrase to each reference's latent tokens."""

    phrase: str
    attention: str  # full | masked
    maps: list[torch.Tensor]  # per reference: [grid_h, grid_w], mean over tokens/heads/layers/steps
    token_mass: torch.Tensor  # [R]: per phrase token, mean total probability on all reference latents
    observations: int  # (layer, step) pairs averaged
    layers: list[int] = field(default_factory=list)

    @property
    def mass_per_reference(self) -> list[float]:
        """Share of the phrase's attention that lands on each reference (``sum(maps[i])``)."""
        return [float(m.sum()) for m in self.maps]


class _LayerRecorder(CAGAttnProcessor):
    """Processor of one recorded layer: report to the recorder, then attend exactly as the stock processor."""

    def __init__(self, recorder: _Recorder, layer: int) -> None:
        super().__init__()
        self.recorder, self.layer = recorder, layer

    def attend(self, query, key, value, padding_mask, cag_mask):  # type: ignore[override]
        self.recorder.observe(query, key, padding_mask, cag_mask, layer=self.layer)
        return super().attend(query, key, value, padding_mask, cag_mask)


class _Recorder:
    """Chosen layers of a model, and swapping recording processors into them for a ``with`` block."""

    def __init__(self, model: CAGModel, layers: Sequence[int] | None = None) -> None:
        blocks = len(model.transformer.transformer_blocks)
        chosen = list(range(blocks)) if layers is None else [int(i) for i in layers]
        bad = [i for i in chosen if not -blocks <= i < blocks]
        if bad or not chosen:
            raise ValueError(f"layers={list(layers or [])}: the model has transformer blocks 0..{blocks - 1}")
        self.model = model
        self.layers = sorted({i % blocks for i in chosen})

    def observe(self, query: torch.Tensor, key: torch.Tensor, padding_mask: torch.Tensor | None,
                cag_mask: PhraseRowMask | None, layer: int) -> None:
        raise NotImplementedError

    @contextmanager
    def installed(self) -> Iterator[Any]:
        """Swap recording processors into the chosen layers; the previous processors come back afterwards."""
        transformer = self.model.transformer
        previous = dict(transformer.attn_processors)
        procs: dict[str, Any] = {}
        for name, proc in previous.items():
            layer = int(name.split(".")[1])
            procs[name] = _LayerRecorder(self, layer) if layer in self.layers else proc
        transformer.set_attn_processor(procs)
        try:
            yield self
        finally:
            transformer.set_attn_processor(previous)


class PhraseAttentionRecorder(_Recorder):
    """Install on a model, pass :meth:`on_predict` to :func:`cag.sampling.sample_batch`, read :meth:`result`.

    Only the conditional DiT passes are recorded (the unconditional pass has no phrase).
    Batches of one sample only: one phrase, one set of reference grids.
    """

    def __init__(self, model: CAGModel, phrase: str, layers: Sequence[int] | None = None) -> None:
        super().__init__(model, layers)
        self.phrase = phrase
        self._active = False
        self._rows: list[int] = []
        self._segments: list[tuple[int, int]] = []
        self._grids: list[tuple[int, int]] = []
        self._sums: list[torch.Tensor] = []
        self._token_mass: torch.Tensor | None = None
        self.observations = 0
        self.attention_mode: str | None = None

    def on_predict(self, cond: Conditioning, conditional: bool) -> None:
        """Called before each DiT pass; locates the phrase rows and reference segments of the conditional pass."""
        self._active = conditional
        if not conditional:
            return
        layout = cond.layout
        if layout.batch_size != 1:
            raise ValueError(f"attention maps are recorded for one sample at a time, got a batch of {layout.batch_size}")
        positions = cond.prompts.phrase_positions[0]
        if self.phrase not in positions:
            raise ValueError(f"phrase {self.phrase!r} is not a grounded phrase of this sample; grounded: {sorted(positions)}")
        if not positions[self.phrase]:
            raise ValueError(f"phrase {self.phrase!r} has no tokens in the instruction")
        if not layout.refs_present:
            raise ValueError("attention to reference latents needs use_ref_latents=true")
        self._rows = list(positions[self.phrase])
        t = layout.text_len
        self._segments = [(t + s, t + e) for s, e in layout.image_segments[1:]]
        self._grids = list(layout.ref_grids)
        self.attention_mode = self.model.attention

    def observe(self, query: torch.Tensor, key: torch.Tensor, padding_mask: torch.Tensor | None,
                cag_mask: PhraseRowMask | None, layer: int = 0) -> None:
        """Add one layer's head-averaged probabilities (conditional passes only)."""
        if not self._active:
            return
        probs = phrase_probabilities(query, key, self._rows, padding_mask, cag_mask).mean(dim=0).cpu()  # [R, L]
        parts = [probs[:, s:e] for s, e in self._segments]
        if self._token_mass is None:
            self._sums = [torch.zeros_like(p) for p in parts]
            self._token_mass = torch.zeros(probs.shape[0])
        for acc, p in zip(self._sums, parts, strict=True):
            acc += p
        self._token_mass += torch.stack([p.sum(dim=-1) for p in parts]).sum(dim=0)
        self.observations += 1

    def result(self) -> PhraseAttention:
        if not self.observations or self._token_mass is None:
            raise RuntimeError("nothing recorded: run sample_batch(..., on_predict=recorder.on_predict) inside installed()")
        n = self.observations
        maps = [(acc / n).mean(dim=0).reshape(h, w) for acc, (h, w) in zip(self._sums, self._grids, strict=True)]
        return PhraseAttention(self.phrase, self.attention_mode or self.model.attention, maps, self._token_mass / n, n,
                               list(self.layers))


FIGURE_TARGETS = ("reference", "name", "place")  # what a figure's tokens may look at, per subject


class FigureAttentionRecorder(_Recorder):
    """Where each subject's figure tokens look: mass on every subject's reference, name and place words.

    Binding at the level of attention: a model that paints each figure from its own reference has
    figure tokens that weigh their own subject's reference (or the words that carry it) above the
    other subjects'. ``rows[i]`` are subject i's target tokens (joint indices), ``columns[kind][j]``
    subject j's keys of that kind; :meth:`observe` adds, per layer, ``[subject i, kind, subject j]``
    = mean over heads and figure tokens of the probability on those keys, under the layer's own
    mask (target rows see every key under full and masked attention, and no reference latent
    under routed attention): the recorder sees what the layer computes.
    """

    def __init__(self, model: CAGModel, layers: Sequence[int] | None = None) -> None:
        super().__init__(model, layers)
        self.rows: list[list[int]] = []
        self.columns: dict[str, list[list[int]]] = {}
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def observe(self, query: torch.Tensor, key: torch.Tensor, padding_mask: torch.Tensor | None,
                cag_mask: PhraseRowMask | None, layer: int = 0) -> None:
        if not self.rows:
            return
        n = len(self.rows)
        out = torch.full((n, len(FIGURE_TARGETS), n), float("nan"))
        for i, rows in enumerate(self.rows):
            probs = phrase_probabilities(query, key, rows, padding_mask, cag_mask).mean(dim=(0, 1)).cpu()  # [L]
            for k, kind in enumerate(FIGURE_TARGETS):
                for j, cols in enumerate(self.columns[kind]):
                    if cols:
                        out[i, k, j] = probs[cols].sum()
        self.sums[layer] = self.sums.get(layer, torch.zeros_like(out)) + out
        self.counts[layer] = self.counts.get(layer, 0) + 1

    def result(self) -> torch.Tensor:
        """``[layers, subject i, kind, subject j]``: mean over the recorded passes."""
        if not self.counts:
            raise RuntimeError("nothing recorded: call the model inside installed() after setting rows and columns")
        return torch.stack([self.sums[layer] / self.counts[layer] for layer in self.layers])


def figure_keys(cond: Conditioning, subjects: Sequence[Any], places: Sequence[str]) -> tuple[list[list[int]], dict[str, list[list[int]]]]:
    """Joint-sequence indices of each subject's figure tokens (query rows) and of its keys per FIGURE_TARGETS kind.

    Rows: the target tokens inside the subject's target box. Keys: its figure box in its own reference
    (segment ``image_id`` of the image stream, after the target), every occurrence of its name phrase
    and of ``places[i]`` (the text stream comes first, so a text position is its joint index).
    """
    layout, positions = cond.layout, cond.prompts.phrase_positions[0]
    t, segments = layout.text_len, layout.image_segments
    if not layout.refs_present:
        raise ValueError("figure attention to the references needs their latents (use_ref_latents)")

    def ref_keys(s: Any) -> list[int]:
        k = s.image_id  # 1-based: segment 0 is the target
        if not 1 <= k < len(segments):
            raise ValueError(f"subject {s.name!r}: image_id={s.image_id} but the sample has {len(segments) - 1} references")
        return [t + segments[k][0] + i for i in box_to_token_indices(s.reference_bbox_2d, *layout.ref_grids[k - 1])]

    rows = [[t + i for i in box_to_token_indices(s.target_bbox_2d, *layout.target_grid)] for s in subjects]
    columns = {
        "reference": [ref_keys(s) for s in subjects],
        "name": [list(positions.get(s.phrase, [])) for s in subjects],
        "place": [list(positions.get(p, [])) for p in places],
    }
    return rows, columns


@torch.no_grad()
def figure_attention(
    model: CAGModel,
    sample: Sample,
    *,
    sigmas: Sequence[float] = (0.3, 0.6, 0.9),
    seed: int = 0,
    image_size: int = 64,
    vlm_image_size: int = 64,
    layers: Sequence[int] | None = None,
) -> torch.Tensor:
    """``[layers, subject i, kind, subject j]`` attention mass of subject i's figure tokens (FIGURE_TARGETS kinds).

    The model denoises the true target noised to each of ``sigmas`` (one fixed noise per sample, as
    a training step would see it; the conditioning is the training path's own), so the figure
    tokens sit where the subjects stand. Keys: subject j's figure box in its reference, the tokens of
    its name phrase ("Name (Fig.k)", every occurrence) and of the words that say where it stands.
    Needs a synthetic sample (its truth has the boxes) with two or more subjects.
    """
    from cag.data.synthetic import place_phrase  # local: the generator is only needed for this probe

    truth = sample.truth
    if truth is None or len(truth.subjects) < 2:
        raise ValueError(f"sample {sample.key!r}: figure attention needs the synthetic truth of two or more subjects")
    subjects = truth.subjects
    places = [place_phrase(sample.instruction, s.position) for s in subjects]
    batch = collate([sample], image_size, vlm_image_size)
    x0, grid = model.encode_images(batch["target_pixels"])
    phrases = sorted({g.phrase for g in sample.groundings} | {s.phrase for s in subjects} | set(places))
    prompts = model.prompt_encoder.encode(batch["instructions"], batch["vlm_references"], [phrases])
    cond = model.assemble(prompts, [model.encode_latents(p) for p in batch["ref_pixels"]], batch["groundings"], grid)
    recorder = FigureAttentionRecorder(model, layers)
    recorder.rows, recorder.columns = figure_keys(cond, subjects, places)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=gen).to(x0)
    with recorder.installed():
        for sigma in sigmas:
            s = torch.full((1,), float(sigma), dtype=x0.dtype, device=x0.device)
            model.predict((1.0 - s.view(-1, 1, 1)) * x0 + s.view(-1, 1, 1) * noise, s, cond)
    return recorder.result()


def default_phrase(sample: Sample) -> str:
    """The first grounded phrase that names a subject reference ("Name (Fig.k)"), else the first grounded phrase."""
    if not sample.groundings:
        raise ValueError(f"sample {sample.key!r} has no groundings; attention maps need a grounded phrase")
    for g in sample.groundings:
        if g.phrase.endswith(f"(Fig.{g.image_id})") and g.image_id < len(sample.references):
            return g.phrase
    return sample.groundings[0].phrase


def record_phrase_attention(
    model: CAGModel,
    sample: Sample,
    phrase: str,
    *,
    modes: Sequence[str] = ("full", "masked"),
    layers: Sequence[int] | None = None,
    sampler: Any = None,
    image_size: int = 64,
    vlm_image_size: int = 64,
    seed: int = 0,
) -> dict[str, tuple[PhraseAttention, Image.Image]]:
    """Sample ``sample`` once per attention mode (same seed) and record ``phrase``'s maps; the model's mode is restored."""
    sampler = sampler or SamplerConfig()
    grounded = sorted({g.phrase for g in sample.groundings})
    if phrase not in grounded:
        raise ValueError(f"phrase {phrase!r} is not grounded in sample {sample.key!r}; grounded: {grounded}")
    for mode in modes:
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode {mode!r} is not one of {list(ATTENTION_MODES)}")
    batch = collate([sample], image_size, vlm_image_size)
    original = model.attention
    out: dict[str, tuple[PhraseAttention, Image.Image]] = {}
    try:
        for mode in modes:
            model.attention = mode
            recorder = PhraseAttentionRecorder(model, phrase, layers)
            with recorder.installed():
                images = sample_batch(model, batch, [seed], sampler, image_size, image_size, on_predict=recorder.on_predict)
            out[mode] = (recorder.result(), to_image(images[0]))
    finally:
        model.attention = original
    return out


def render_attention_figure(
    sample: Sample,
    phrase: str,
    results: dict[str, tuple[PhraseAttention, Image.Image]],
    display_size: int = 160,
) -> Image.Image:
    """One row per attention mode: each reference with the phrase's heatmap over it, then the generated image.

    Each row is normalised by its own maximum over all references, so a row shows where
    the phrase's attention goes relative to everywhere else it goes; the per-reference
    mass is printed so rows stay comparable in absolute terms. The phrase's box is drawn
    (dashed) on its reference.
    """
    from matplotlib import patches

    from cag.utils import plots  # local: matplotlib is a slow import that recording the maps does not need

    n_refs = len(sample.references)
    boxes = [g for g in sample.groundings if g.phrase == phrase]
    fig, axes = plots.figure(len(results), n_refs + 1, figsize=(2.2 * (n_refs + 1), 2.4 * len(results) + 0.6))
    for row, (mode, (att, generated)) in enumerate(results.items()):
        peak = max(float(m.max()) for m in att.maps) or 1.0
        for r in range(n_refs):
            ax = axes[row][r]
            ref = sample.references[r].convert("RGB").resize((display_size, display_size))
            heat = torch.nn.functional.interpolate(att.maps[r][None, None].float(), size=(display_size, display_size),
                                                   mode="nearest")[0, 0]
            ax.imshow(ref)
            ax.imshow((heat / peak).numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
            for g in boxes:
                if g.image_id == r + 1:
                    x1, y1, x2, y2 = (v / BOX_SCALE * display_size for v in g.bbox_2d)
                    ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="white", ls="--", lw=1))
            ax.set_title(f"Fig.{r + 1}  mass {att.mass_per_reference[r]:.3f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        ax = axes[row][n_refs]
        ax.imshow(generated.resize((display_size, display_size)))
        ax.set_title("generated", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        axes[row][0].set_ylabel(MODE_TITLES.get(mode, mode), fontsize=10)
    plots.suptitle(fig, f'attention of "{phrase}" to reference latents ({sample.key})', fontsize=10)
    buf = io.BytesIO()
    plots.save(fig, buf, dpi=100, format="png")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def run_visualize_attention(cfg: Any, *, model_explicit: bool = False, ckpt_explicit: bool = False) -> dict[str, Any]:
    """``src/visualize_attention.py``: pick the sample and phrase, record both modes, write PNG + JSON."""
    inp = cfg.input
    key, index = inp.get("key"), int(inp.get("index", 0))
    if inp.get("source", "synthetic") == "synthetic" and key is None and inp.get("n") is None:
        with open_dict(inp):
            inp.n = index + 1  # generate only what is needed
    samples = samples_from_config(inp)
    if key is not None:
        found = [s for s in samples if s.key == key]
        if not found:
            raise ValueError(f"input.key={key!r} is not in the input ({len(samples)} samples, e.g. {samples[0].key!r})")
        sample = found[0]
    else:
        if not 0 <= index < len(samples):
            raise ValueError(f"input.index={index} is outside the input's {len(samples)} samples")
        sample = samples[index]
    phrase = cfg.get("phrase") or default_phrase(sample)

    checkpoint = resolve_checkpoint(None if model_explicit and not ckpt_explicit else cfg.get("ckpt"))
    model, info = load_model_for_inference(
        checkpoint, cfg.model if (checkpoint is None or model_explicit) else None, device=cfg.get("device", "cpu")
    )
    image_size = int(cfg.get("image_size") or info["image_size"])
    vlm_image_size = int(cfg.get("vlm_image_size") or info["vlm_image_size"])
    sampler = SamplerConfig(num_steps=int(cfg.num_steps), cfg_scale=float(cfg.cfg_scale),
                            negative_prompt=str(cfg.negative_prompt), use_ref_latents=True)
    layers = list(cfg.layers) if cfg.get("layers") is not None else None
    results = record_phrase_attention(model, sample, phrase, modes=list(cfg.modes), layers=layers, sampler=sampler,
                                      image_size=image_size, vlm_image_size=vlm_image_size, seed=int(cfg.seed))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"attention_{sample.key}"
    figure = render_attention_figure(sample, phrase, results, display_size=int(cfg.display_size))
    figure.save(out / f"{stem}.png")
    summary = {
        "key": sample.key,
        "phrase": phrase,
        "instruction": sample.instruction,
        "groundings": [g.to_json() for g in sample.groundings if g.phrase == phrase],
        "checkpoint": info.get("checkpoint"),
        "model_name": info.get("model_name"),
        "num_steps": sampler.num_steps,
        "cfg_scale": sampler.cfg_scale,
        "seed": int(cfg.seed),
        "modes": {
            mode: {
                "layers": att.layers,
                "observations": att.observations,
                "mass_per_reference": att.mass_per_reference,
                "max_token_mass": float(att.token_mass.max()),
                "maps": [m.tolist() for m in att.maps],
            }
            for mode, (att, _) in results.items()
        },
        "figure": str(out / f"{stem}.png"),
    }
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
    masses = "; ".join(f"{m}: " + ", ".join(f"Fig.{i + 1}={v:.3f}" for i, v in enumerate(d["mass_per_reference"]))
                       for m, d in summary["modes"].items())
    print(f'"{phrase}" ({sample.key}) attention mass per reference -> {masses}\nfigure: {summary["figure"]}')
    return summary
