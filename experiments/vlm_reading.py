"""Can the tiny VLM learn to read its references? A language-model probe of the concept level.

    python experiments/vlm_reading.py [--steps 3000] [--batch 16] [--lr 2e-3] [--synthetic level3]
        [--set num_characters=1] [--vlm-image-size 32] [--n-eval 200] [--eval-every 500] [--out DIR]

The paper's concept level (VAE dropout, Sec. 3.3) presupposes a VLM whose text stream already
carries what each reference looks like, so that a DiT denied the references' latents can still
draw the subjects. The released Qwen2.5-VL reads images; the embedded default's VLM is randomly
initialised and frozen, so at CPU scale that premise is absent by construction. This asks whether
the same tiny VLM (the model config's own, built by :func:`cag.models.vlm.build_vlm`) can be given
it by training it as a language model on the training split: the prompt exactly as the DiT's
conditioning builds it (:class:`cag.models.conditioning.PromptEncoder`: template, "Picture k"
images, instruction), next-token loss on the instruction's tokens only.

Reading is measured on the test split (unseen characters): for each phrase grounded to a
subject's reference (with colours in the instruction: the part's colour word, e.g. "pink" of
"pink dotted shirt"), is its first token the model's top prediction? Three conditions per sample:
the references as given; every reference replaced by a grey image (what the words alone predict);
the subjects' references exchanged cyclically (a model that reads Picture k for subject k now
predicts another subject's colours). reading = accuracy(given) - accuracy(grey); binding =
accuracy(given) - accuracy(exchanged); both paired over samples with 95 % bootstrap intervals.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from cag.data.batching import square
from cag.data.sources import synthetic_config
from cag.data.synthetic import Sample, SyntheticConfig, generate_sample
from cag.models.conditioning import PromptEncoder
from cag.models.vlm import build_vlm
from experiments.binding_attention import synthetic_settings
from experiments.stats import bootstrap

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = ("given", "grey", "exchanged")
GREY = (128, 128, 128)


@dataclass
class Prompt:
    """One sample's prompt as the model sees it: token ids, next-token labels, and the probed positions."""

    input_ids: torch.Tensor  # [T]
    labels: torch.Tensor  # [T], -100 outside the instruction
    probes: list[tuple[int, int]]  # (position whose prediction is read, the token it should predict)


def references(sample: Sample, condition: str, size: int) -> list[Image.Image]:
    """The sample's references for the VLM under one of :data:`CONDITIONS`."""
    refs = [square(r, size) for r in sample.references]
    if condition == "grey":
        return [Image.new("RGB", (size, size), GREY) for _ in refs]
    if condition == "exchanged":
        ids = sorted({s.image_id for s in sample.truth.subjects})
        if len(ids) < 2:
            raise ValueError(f"sample {sample.key}: exchanging references needs two subjects")
        out = list(refs)
        for a, b in zip(ids, ids[1:] + ids[:1], strict=True):
            out[a - 1] = refs[b - 1]
        return out
    if condition != "given":
        raise ValueError(f"unknown condition {condition!r}; expected one of {CONDITIONS}")
    return refs


def subject_phrases(sample: Sample) -> list[str]:
    """Phrases grounded to a subject's reference, without the subject's name (its first token is a name, not a look)."""
    if sample.truth is None:
        raise ValueError(f"sample {sample.key}: the probe needs the synthetic truth (which references are subjects)")
    subjects = {s.image_id: s.phrase for s in sample.truth.subjects}
    return [g.phrase for g in sample.groundings if g.image_id in subjects and g.phrase != subjects[g.image_id]]


def tokenise(encoder: PromptEncoder, batch_ids: torch.Tensor, sample: Sample, row: int) -> Prompt:
    """Labels on the instruction's tokens; a probe at the token before each subject phrase's first token.

    Phrase tokens are located by the conditioning's own rule (``PromptEncoder._phrase_positions``, which
    also refuses an instruction that tokenises differently inside the template).
    """
    ids = batch_ids[row].tolist()
    start = encoder._instruction_start(ids, len(sample.references))  # noqa: SLF001 - the conditioning's own rule
    n = len(encoder.tokenizer(sample.instruction, add_special_tokens=False).input_ids)
    labels = torch.full_like(batch_ids[row], -100)
    labels[start : start + n] = batch_ids[row, start : start + n]
    phrases = subject_phrases(sample)
    positions = encoder._phrase_positions(ids, sample.instruction, len(sample.references), phrases)  # noqa: SLF001
    probes = []
    for phrase in phrases:
        first = positions[phrase][0] + encoder.drop_idx if positions[phrase] else None
        if first:
            probes.append((first - 1, ids[first]))
    return Prompt(batch_ids[row], labels, probes)


def encode(encoder: PromptEncoder, samples: list[Sample], condition: str, size: int) -> tuple[dict, list[Prompt]]:
    """Processor inputs of a batch (right-padded) and each sample's labels and probes."""
    texts = [encoder.prompt_text(s.instruction, len(s.references)) for s in samples]
    images = [im for s in samples for im in references(s, condition, size)]
    inputs = encoder.processor(text=texts, images=images, padding=True, return_tensors="pt")
    prompts = [tokenise(encoder, inputs["input_ids"], s, i) for i, s in enumerate(samples)]
    for i, p in enumerate(prompts):
        p.labels[inputs["attention_mask"][i] == 0] = -100
    return inputs, prompts


@torch.no_grad()
def accuracy(vlm: torch.nn.Module, encoder: PromptEncoder, samples: list[Sample], condition: str, size: int,
             batch: int = 20) -> np.ndarray:
    """Per sample: the share of its subject phrases whose first token is the top prediction (NaN: none probed)."""
    was_training = vlm.training
    vlm.eval()
    out = []
    for i in range(0, len(samples), batch):
        group = samples[i : i + batch]
        inputs, prompts = encode(encoder, group, condition, size)
        logits = vlm(**inputs).logits
        for row, p in enumerate(prompts):
            hits = [float(logits[row, pos].argmax().item() == t) for pos, t in p.probes]
            out.append(float(np.mean(hits)) if hits else float("nan"))
    vlm.train(was_training)
    return np.asarray(out)


def evaluate(vlm: torch.nn.Module, encoder: PromptEncoder, samples: list[Sample], size: int) -> dict[str, object]:
    """Accuracy per condition, reading and (with two or more subjects) binding, each with its interval."""
    conditions = [c for c in CONDITIONS if c != "exchanged" or min(len(s.truth.subjects) for s in samples) >= 2]
    acc = {c: accuracy(vlm, encoder, samples, c, size) for c in conditions}
    row: dict[str, object] = {c: bootstrap(acc[c][None]) for c in conditions}
    row["reading"] = bootstrap((acc["given"] - acc["grey"])[None], difference=True)
    if "exchanged" in acc:
        row["binding"] = bootstrap((acc["given"] - acc["exchanged"])[None], difference=True)
    return row


def fmt(e) -> str:
    return f"{e.mean:.3f} [{e.lo:.3f}, {e.hi:.3f}]"


def train(cfg: SyntheticConfig, args: argparse.Namespace) -> list[dict[str, object]]:
    """Train the VLM as a language model on the training split; evaluate every ``eval_every`` steps."""
    mcfg = OmegaConf.load(ROOT / "conf" / "model" / f"{args.model}.yaml")
    size = int(args.vlm_image_size or mcfg.vlm_image_size)
    mcfg.vlm_image_size = size
    torch.manual_seed(args.seed)
    vlm, processor = build_vlm(mcfg.vlm, seed=args.seed)
    encoder = PromptEncoder(vlm, processor)
    test = [generate_sample("test", i, cfg) for i in range(args.n_eval)]
    vlm.requires_grad_(True).train()
    opt = torch.optim.AdamW(vlm.parameters(), lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    rows, losses, t0 = [], [], time.time()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            row = {"step": step, "loss": float(np.mean(losses)) if losses else float("nan"),
                   "seconds": round(time.time() - t0), **evaluate(vlm, encoder, test, size)}
            rows.append(row)
            losses = []
            print(f"step {step:5d}  loss {row['loss']:.3f}  " + "  ".join(
                f"{k} {fmt(row[k])}" for k in (*CONDITIONS, "reading", "binding") if k in row), flush=True)
        if step == args.steps:
            break
        samples = [generate_sample("train", rng.randrange(args.train_samples), cfg) for _ in range(args.batch)]
        inputs, prompts = encode(encoder, samples, "given", size)
        loss = vlm(**inputs, labels=torch.stack([p.labels for p in prompts])).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return rows


def write(rows: list[dict[str, object]], out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    keys = [k for k in (*CONDITIONS, "reading", "binding") if k in rows[0]]
    with (out / "curve.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "seconds"] + [f"{k}_{p}" for k in keys for p in ("mean", "lo", "hi")])
        for r in rows:
            w.writerow([r["step"], f"{r['loss']:.4f}", r["seconds"]]
                       + [f"{getattr(r[k], p):.4f}" for k in keys for p in ("mean", "lo", "hi")])
    lines = [f"`{command}`", "", "| step | loss | " + " | ".join(keys) + " |", "|" + "---|" * (2 + len(keys))]
    lines += [f"| {r['step']} | {r['loss']:.3f} | " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    (out / "reading.md").write_text("\n".join(lines) + "\n")
    (out / "reading.json").write_text(json.dumps(
        [{k: (v.to_json() if hasattr(v, "to_json") else v) for k, v in r.items()} for r in rows], indent=1))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="conf/model option whose VLM is trained (default tiny)")
    ap.add_argument("--synthetic", default="level3", help="conf/synthetic option or YAML file (default level3)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a synthetic key")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vlm-image-size", type=int, default=None, help="reference side for the VLM (default: the model's)")
    ap.add_argument("--train-samples", type=int, default=20000, help="training-split indices drawn from")
    ap.add_argument("--n-eval", type=int, default=200, help="first N test samples")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--out", type=Path, default=None, help="write curve.csv, reading.md and reading.json here")
    args = ap.parse_args(argv)
    if args.steps < 0 or args.eval_every < 1 or args.n_eval < 1 or args.batch < 1:
        raise SystemExit("--steps >= 0, --eval-every >= 1, --n-eval >= 1 and --batch >= 1 are required")
    cfg = synthetic_config(synthetic_settings(args.synthetic, args.set))
    rows = train(cfg, args)
    if args.out:
        write(rows, args.out, "python experiments/vlm_reading.py " + " ".join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
