"""A Qwen2-style tokenizer trained locally, so the embedded default needs no download.

It uses transformers' own ``Qwen2Tokenizer`` (byte-level BPE with Qwen's pre-tokenizer
regex) and carries Qwen's chat and vision special tokens, so the real
``Qwen2_5_VLProcessor`` drives it exactly as it drives the released tokenizer. Only the
vocabulary is small and learned from a fixed in-code corpus: the result is identical on
every machine.
"""

from __future__ import annotations

import json
from functools import lru_cache

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer

# Same special tokens (and order) as Qwen2.5-VL, so processor and model config line up.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# A chat template in Qwen's format, used by grounding's local backend (generation).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "Describe the key features of the input image (color, shape, size, texture, objects, background), then "
    "explain how the user's text instruction should alter or modify the image. Generate a new image that meets "
    "the user's requirements while maintaining consistency with the original input where appropriate.",
    "Picture 1: Picture 2: Picture 3: Picture 4: (Fig.1) (Fig.2) (Fig.3) (Fig.4) Fig. 1 Fig. 2 Fig. 3",
    "Close-up. Medium shot. Long shot. Oblique side view from above. Tracking shot at the schoolyard.",
    "stands on the left, stands on the right, stands in the centre, sits beside him, leans against a wall,",
    "her pink twin-tails falling over her pink striped shirt and navy pants; his green dotted shirt",
    "red orange yellow green blue navy purple pink brown black white grey teal cyan magenta gold silver",
    "short hair long hair spiky hair twin-tails ponytail bob curly hair hat glasses scarf jacket shirt",
    "striped dotted solid checked pants skirt shorts trousers dress top sleeveless hoodie coat boots",
    "The background is a park with a red bench, a green tree and a yellow lamp post under a blue sky.",
    "The background (Fig.3) shows a beach, a street, a forest, a classroom, a kitchen, a garden, a city.",
    "Rin Xi Kai Cang Mei Aya Bo Dan Eli Fumi Gen Hana Iku Jin Kenji Lio Mako Nao Ori Pia Quin Ren Sora Taro",
    "Identify and extract all character and clothing names that appear in the reference images from the "
    "description. Draw a bounding box around the location of each object in the list, and output in JSON "
    'format which image each object is in and its bbox coordinates. {"image_id": "1", "bbox_2d": [1, 2, 3, 4], '
    '"label": "object name"} the list is as follows',
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 [ ] { } , . : ; ' \" ( ) - _ ! ? \n",
    # Everyday descriptive English, so that common words are single tokens as in a real tokenizer's
    # vocabulary; the text stream is then a few words long per phrase instead of a few letters.
    "A girl waves at the viewer and smiles, wearing a warm coat. He stands by the door, his hair neatly cut.",
    "They walk together along the street; she turns towards him, admiring his new hat and his bright scarf.",
    "The boy is sitting on a bench in the park, with a tree behind him and a lamp post nearby.",
    "Behind them lies a quiet meadow at sunset, where a small tent and a red car can be seen.",
    "The setting is a snowy field with a wooden house; the scene takes place in front of a tall building.",
    "Her long hair is falling past the shoulders; his spiky hair is sticking up; twin tails bouncing on both sides.",
    "The dress contrasts with the dark trousers. The yellow umbrella stands out against the gray sky.",
    "A man in a maroon jacket and khaki pants, a woman in an olive skirt, a child in lime and navy clothes.",
    "The night plaza is lit by a lamp; the desert is hot and empty; the beach has a mailbox by the road.",
    "She also wears round glasses. He also wears a cap. They wear matching shoes. It is a sunny day outside.",
    "smiles back at, looks at, points to, holds hands with, runs past, waits for, talks with, leans on",
    "in the middle, on the left side, on the right side, in the background, in the foreground, next to",
    "eye-level, front-facing, wide shot, portrait, landscape, view, camera, lighting, shadow, colour, color",
    "Eye-level shot. Front-facing view. Wide angle. In the morning. On a bench. Behind the house. The end.",
    "She smiles. He waves. They stand. It rains. We see. In front. On top. At night. With friends. Close-up.",
]


@lru_cache(maxsize=4)
def _trained_vocab(vocab_size: int) -> tuple[str, tuple[tuple[str, str], ...]]:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = tuple(tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"])
    return json.dumps(model["vocab"]), merges


def build_tiny_tokenizer(vocab_size: int = 768) -> Qwen2Tokenizer:
    """Deterministic small Qwen2 tokenizer with the vision special tokens appended after the BPE vocab."""
    vocab_json, merges = _trained_vocab(vocab_size)
    vocab: dict[str, int] = json.loads(vocab_json)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=list(merges))
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
