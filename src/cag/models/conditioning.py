"""The frozen VLM's conditioning: instruction + references -> text stream, and phrase -> token spans.

Follows diffusers' QwenImageEditPlusPipeline prompt format ("Picture k:
<|vision_start|><|image_pad|><|vision_end|>" per reference, then the instruction, inside
the Edit system template), takes the last hidden layer and drops the system prefix. Where
diffusers hard-codes the prefix length (64 for the released tokenizer), it is counted here
from the tokenizer in use, so the tiny tokenizer and the real one share the code.

Phrases are located by characters (every occurrence, possessives included) and mapped to
tokens through the tokenizer's offset mapping: a token belongs to a phrase when its
character span overlaps the phrase's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
PICTURE_TEMPLATE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"


def phrase_char_spans(instruction: str, phrase: str) -> list[tuple[int, int]]:
    """Every (possibly overlapping-free) occurrence of ``phrase`` in ``instruction``."""
    spans, start = [], 0
    while phrase:
        i = instruction.find(phrase, start)
        if i < 0:
            break
        spans.append((i, i + len(phrase)))
        start = i + len(phrase)
    return spans


def char_spans_to_tokens(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Token indices whose character span overlaps any of ``spans``."""
    out = []
    for ti, (a, b) in enumerate(offsets):
        if b <= a:
            continue
        if any(a < e and b > s for s, e in spans):
            out.append(ti)
    return out


@dataclass
class EncodedPrompts:
    """Text stream of a batch: hidden states, padding, reference-token positions, phrase positions."""

    hidden: torch.Tensor  # [B, T, D]
    mask: torch.Tensor  # [B, T] bool
    image_pad: torch.Tensor  # [B, T] bool
    phrase_positions: list[dict[str, list[int]]]  # per sample: phrase -> text-stream positions (all occurrences)

    @classmethod
    def from_sequences(
        cls, seqs: list[torch.Tensor], pads: list[torch.Tensor], positions: list[dict[str, list[int]]]
    ) -> EncodedPrompts:
        """Right-pad per-sample streams (``[T_i, D]`` hidden, ``[T_i]`` image-pad flags) into a batch."""
        t_max = max(s.shape[0] for s in seqs)
        b, d = len(seqs), seqs[0].shape[-1]
        hid = seqs[0].new_zeros(b, t_max, d)
        mask = torch.zeros(b, t_max, dtype=torch.bool, device=hid.device)
        image_pad = torch.zeros(b, t_max, dtype=torch.bool, device=hid.device)
        for i, s in enumerate(seqs):
            hid[i, : s.shape[0]] = s
            mask[i, : s.shape[0]] = True
            image_pad[i, : s.shape[0]] = pads[i].to(hid.device)
        return cls(hid, mask, image_pad, positions)

    def sequences(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-sample unpadded ``(hidden [T_i, D], image_pad [T_i])``, the form a cache stores."""
        return [(self.hidden[i, self.mask[i]], self.image_pad[i, self.mask[i]]) for i in range(self.hidden.shape[0])]

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> EncodedPrompts:
        return EncodedPrompts(
            self.hidden.to(device=device, dtype=dtype or self.hidden.dtype),
            self.mask.to(device),
            self.image_pad.to(device),
            self.phrase_positions,
        )


class PromptEncoder:
    """Runs the frozen VLM (no gradients) with its processor; holds no trainable state."""

    def __init__(self, vlm: torch.nn.Module, processor, template: str = EDIT_TEMPLATE) -> None:
        self.vlm = vlm
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = template
        prefix = template.split("{}")[0]
        self.drop_idx = len(self.tokenizer(prefix, add_special_tokens=False).input_ids)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.vision_end_id = self.tokenizer.convert_tokens_to_ids("<|vision_end|>")

    def prompt_text(self, instruction: str, num_refs: int) -> str:
        pictures = "".join(PICTURE_TEMPLATE.format(k + 1) for k in range(num_refs))
        return self.template.format(pictures + instruction)

    def _instruction_start(self, ids: list[int], num_refs: int) -> int:
        """Text-stream index (before dropping the prefix) where the instruction's tokens begin."""
        if num_refs:
            return max(i for i, t in enumerate(ids) if t == self.vision_end_id) + 1
        return self.drop_idx

    @torch.no_grad()
    def encode(
        self,
        instructions: list[str],
        references: list[list[Image.Image]],
        phrases: list[list[str]] | None = None,
    ) -> EncodedPrompts:
        device = next(self.vlm.parameters()).device
        texts = [self.prompt_text(ins, len(refs)) for ins, refs in zip(instructions, references, strict=True)]
        images = [im for refs in references for im in refs] or None
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        out = self.vlm(
            input_ids=inputs["input_ids"].to(device),
            attention_mask=inputs["attention_mask"].to(device),
            pixel_values=inputs["pixel_values"].to(device, self.vlm.dtype) if images else None,
            image_grid_thw=inputs["image_grid_thw"].to(device) if images else None,
            output_hidden_states=True,
        )
        hidden = out.hidden_states[-1]
        attn = inputs["attention_mask"].bool()
        seqs, pads, positions = [], [], []
        for i in range(len(texts)):
            valid = attn[i].nonzero().squeeze(-1)
            ids = inputs["input_ids"][i, valid].tolist()
            seqs.append(hidden[i, valid.to(hidden.device)][self.drop_idx :])
            pads.append(torch.tensor([t == self.image_token_id for t in ids[self.drop_idx :]], dtype=torch.bool))
            positions.append(self._phrase_positions(ids, instructions[i], len(references[i]), phrases[i] if phrases else []))
        return EncodedPrompts.from_sequences(seqs, pads, positions)

    def _phrase_positions(self, ids: list[int], instruction: str, num_refs: int, phrases: list[str]) -> dict[str, list[int]]:
        if not phrases:
            return {}
        enc = self.tokenizer(instruction, add_special_tokens=False, return_offsets_mapping=True)
        start = self._instruction_start(ids, num_refs)
        if ids[start : start + len(enc.input_ids)] != list(enc.input_ids):
            raise RuntimeError(
                "the instruction tokenises differently inside the chat template; phrase spans cannot be mapped "
                f"(instruction={instruction[:60]!r})"
            )
        out: dict[str, list[int]] = {}
        for phrase in phrases:
            spans = phrase_char_spans(instruction, phrase)
            toks = char_spans_to_tokens([tuple(o) for o in enc["offset_mapping"]], spans)
            out[phrase] = [start - self.drop_idx + t for t in toks]
        return out
