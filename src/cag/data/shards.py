"""WebDataset shards of multi-reference samples: writing, decoding, and a reader that survives bad data.

One sample is one group of tar members sharing a key (format in ``data/README.md``)::

    <key>.json        instruction, groundings, task_type, num_references, has_target, truth
    <key>.ref0.png    reference 1 ("Fig.1"), ..., <key>.ref{N-1}.png
    <key>.target.png  the target, when the sample has one

WebDataset splits a member name at the *first* dot after the key, so keys carry no dots
and members are named ``ref0.png`` rather than ``ref_0.png``-with-dots variants.

Shards are data, not code: nothing here unpickles. Members that only a pickle loader
could read (``.pth``, ``.pt``, ``.pkl``, ``.pickle``, ``.pyd``) make their sample refused,
and we never call webdataset's default ``decode()``, which would unpickle them.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import webdataset as wds
from PIL import Image

from cag.data.cache import CachedConditioning, matches_sample
from cag.data.sample import Grounding, GroundingError, Sample, validate_grounding
from cag.data.truth import Truth, TruthError

log = logging.getLogger(__name__)

FORMAT = "cag-sample/1"
JSON_MEMBER = "json"
TARGET_MEMBER = "target.png"
PICKLE_SUFFIXES = ("pth", "pt", "pkl", "pickle", "pyd")


def ref_member(i: int) -> str:
    """Member name of reference ``i`` (0-based; it is "Fig.{i+1}" in the instruction)."""
    return f"ref{i}.png"


class ShardSampleError(ValueError):
    """A sample in a shard that cannot be used; ``kind`` groups the counts, the message names shard and key."""

    def __init__(self, shard: str, key: str, kind: str, detail: str):
        super().__init__(f"shard {shard}: sample {key!r}: {kind}: {detail}")
        self.shard, self.key, self.kind, self.detail = shard, key, kind, detail

    @property
    def reason(self) -> str:
        return f"{self.kind}: {self.detail}"


# --------------------------------------------------------------------------- writing


@dataclass
class WriteSummary:
    """What a write produced and what it refused, so a bad dataset never goes unnoticed."""

    out_pattern: str
    shards: list[str] = field(default_factory=list)
    written: int = 0
    rejected: list[dict[str, str]] = field(default_factory=list)
    bytes_written: int = 0
    seconds: float = 0.0

    @property
    def rejected_by_reason(self) -> dict[str, int]:
        return dict(Counter(r["reason"].split(":", 1)[0] for r in self.rejected))

    @property
    def samples_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "out_pattern": self.out_pattern,
            "shards": list(self.shards),
            "num_shards": len(self.shards),
            "written": self.written,
            "rejected": len(self.rejected),
            "rejected_by_reason": self.rejected_by_reason,
            "rejected_samples": list(self.rejected),
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "samples_per_second": round(self.samples_per_second, 1),
        }


def encode_png(img: Image.Image) -> bytes:
    """RGB PNG: lossless (the round trip is pixel-exact) and byte-stable for a given image."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def sample_to_wds(sample: Sample) -> dict[str, Any]:
    """The tar members of one sample (values are bytes, ready for ``TarWriter`` with ``encoder=False``)."""
    sample.validate()
    meta = {
        "format": FORMAT,
        "instruction": sample.instruction,
        "groundings": [g.to_json() for g in sample.groundings],
        "task_type": sample.task_type,
        "num_references": len(sample.references),
        "has_target": sample.target is not None,
        "truth": sample.truth.to_dict() if sample.truth is not None else None,
    }
    record: dict[str, Any] = {
        "__key__": sample.key,
        JSON_MEMBER: json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
    }
    for i, ref in enumerate(sample.references):
        record[ref_member(i)] = encode_png(ref)
    if sample.target is not None:
        record[TARGET_MEMBER] = encode_png(sample.target)
    if sample.conditioning is not None:
        record.update(sample.conditioning.to_members())
    return record


def _check_pattern(out_pattern: str) -> None:
    try:
        first, second = out_pattern % 0, out_pattern % 1
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"shard pattern {out_pattern!r} needs exactly one integer field such as %06d: {exc}"
        ) from exc
    if first == second:
        raise ValueError(f"shard pattern {out_pattern!r} needs an integer field such as %06d")


def write_shards(
    samples: Iterable[Sample],
    out_pattern: str,
    maxcount: int = 1000,
    *,
    progress: Callable[[int], None] | None = None,
) -> WriteSummary:
    """Write samples to ``out_pattern % i`` tars, ``maxcount`` per shard; refuse (and record) invalid ones.

    A sample is refused, not fatal, when it fails ``Sample.validate`` or repeats a key:
    one bad sample should not cost a long generation run. ``progress`` is called with the
    number of samples handled so far (written or refused), for a progress bar.
    """
    _check_pattern(out_pattern)
    if isinstance(maxcount, bool) or not isinstance(maxcount, int) or maxcount < 1:
        raise ValueError(f"maxcount={maxcount!r} must be a positive int")
    folder = os.path.dirname(out_pattern)
    if folder:
        os.makedirs(folder, exist_ok=True)
    summary = WriteSummary(out_pattern=out_pattern)
    seen: set[str] = set()
    start = time.perf_counter()
    handled = 0
    # mtime fixed and no re-encoding: the same samples give byte-identical shards.
    writer = wds.ShardWriter(out_pattern, maxcount=maxcount, verbose=0, encoder=False, mtime=0.0,
                             post=summary.shards.append)
    try:
        for sample in samples:
            handled += 1
            key = getattr(sample, "key", "?")
            try:
                if key in seen:
                    raise GroundingError(f"duplicate key {key!r}")
                record = sample_to_wds(sample)
            except (ValueError, OSError, TypeError, AttributeError) as exc:  # GroundingError is a ValueError
                reason = f"{'duplicate_key' if key in seen else 'invalid_sample'}: {exc}"
                summary.rejected.append({"key": str(key), "reason": reason})
                log.warning("rejected sample %r: %s", key, reason)
            else:
                seen.add(key)
                writer.write(record)
                summary.written += 1
            if progress is not None:
                progress(handled)
    finally:
        writer.close()
    if summary.written == 0:
        # ShardWriter opens its first tar eagerly; an empty shard would only confuse readers.
        for path in summary.shards:
            if os.path.exists(path):
                os.remove(path)
        summary.shards.clear()
    summary.bytes_written = sum(os.path.getsize(p) for p in summary.shards)
    summary.seconds = time.perf_counter() - start
    return summary


def existing_shards(out_pattern: str) -> list[str]:
    """Files a pattern such as ``dir/shard-%06d.tar`` would name, found on disk."""
    _check_pattern(out_pattern)
    head, _, tail = out_pattern.partition("%")
    rest = tail.lstrip("0123456789")[1:]  # drop the conversion's width and letter
    return sorted(glob.glob(glob.escape(head) + "*" + glob.escape(rest)))


def brace_urls(shards: list[str]) -> str:
    """One WebDataset url string for consecutive shards, e.g. ``dir/shard-{000000..000003}.tar``."""
    if not shards:
        return ""
    if len(shards) == 1:
        return shards[0]
    first, last = shards[0], shards[-1]
    i = 0
    while i < min(len(first), len(last)) and first[i] == last[i]:
        i += 1
    while i > 0 and first[i - 1].isdigit():
        i -= 1
    j = i
    while j < len(first) and first[j].isdigit():
        j += 1
    suffix = first[j:]
    if not last.endswith(suffix) or not last[: len(last) - len(suffix)][i:].isdigit():
        return " ".join(shards)
    return f"{first[:i]}{{{first[i:j]}..{last[i:len(last) - len(suffix)]}}}{suffix}"


# --------------------------------------------------------------------------- reading


def _tar_tail_problem(url: str) -> str | None:
    """Why a local uncompressed tar looks cut short, or None (remote or compressed shards are not checked)."""
    if not url.endswith(".tar") or not os.path.isfile(url):
        return None
    size = os.path.getsize(url)
    if size % 512:
        return f"size {size} is not a whole number of 512-byte tar blocks"
    if size < 1024:
        return f"size {size} is too small to hold the end-of-archive marker"
    with open(url, "rb") as fh:
        fh.seek(size - 1024)
        if any(fh.read(1024)):
            return "the end-of-archive marker (two zero blocks) is missing"
    return None


def _ext_is_pickle(member: str) -> bool:
    return member.lower().rsplit(".", 1)[-1] in PICKLE_SUFFIXES


def _decode_image(shard: str, key: str, member: str, value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        img = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        try:
            img = Image.open(io.BytesIO(bytes(value)))
            img.load()
        except Exception as exc:  # PIL raises many types for broken data
            raise ShardSampleError(shard, key, "undecodable_image", f"member {member}: {exc}") from exc
    else:
        raise ShardSampleError(shard, key, "undecodable_image", f"member {member} holds a {type(value).__name__}")
    return img if img.mode == "RGB" else img.convert("RGB")


def _decode_json(shard: str, key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    try:
        text = value.decode("utf-8") if isinstance(value, (bytes, bytearray, memoryview)) else str(value)
        meta = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise ShardSampleError(shard, key, "bad_json", f"member {JSON_MEMBER}: {exc}") from exc
    if not isinstance(meta, dict):
        raise ShardSampleError(shard, key, "bad_json", f"member {JSON_MEMBER} is a {type(meta).__name__}, not an object")
    return meta


def sample_from_wds(record: dict[str, Any]) -> Sample:
    """One webdataset record (raw bytes or already-decoded values) -> a validated :class:`Sample`.

    Raises :class:`ShardSampleError` naming the shard (``__url__``) and key for a pickle
    member, a missing member, an undecodable image or JSON, or a grounding whose image_id
    or box is out of range.
    """
    shard = str(record.get("__url__", "<unknown shard>"))
    key = str(record.get("__key__", "<no key>"))
    members = [k for k in record if not k.startswith("__")]
    pickled = sorted(m for m in members if _ext_is_pickle(m))
    if pickled:
        raise ShardSampleError(shard, key, "pickle_refused", f"member(s) {', '.join(pickled)} would need unpickling")
    if JSON_MEMBER not in record:
        raise ShardSampleError(shard, key, "missing_member", f"{JSON_MEMBER} (members present: {sorted(members)})")
    meta = _decode_json(shard, key, record[JSON_MEMBER])
    for field_name, kind in (("instruction", str), ("num_references", int)):
        if not isinstance(meta.get(field_name), kind) or isinstance(meta.get(field_name), bool):
            raise ShardSampleError(shard, key, "bad_json", f"field {field_name!r} is {meta.get(field_name)!r}")
    n = meta["num_references"]
    if n < 1:
        raise ShardSampleError(shard, key, "bad_json", f"num_references={n} must be >= 1")
    wanted = [ref_member(i) for i in range(n)]
    if meta.get("has_target", True):
        wanted.append(TARGET_MEMBER)
    missing = [m for m in wanted if m not in record]
    if missing:
        raise ShardSampleError(shard, key, "missing_member", ", ".join(missing))
    extra = sorted(m for m in members if m.startswith("ref") and m.endswith(".png") and m not in wanted)
    if extra:
        raise ShardSampleError(shard, key, "bad_json", f"num_references={n} but members {extra} exist too")
    references = [_decode_image(shard, key, ref_member(i), record[ref_member(i)]) for i in range(n)]
    target = _decode_image(shard, key, TARGET_MEMBER, record[TARGET_MEMBER]) if TARGET_MEMBER in wanted else None
    raw_groundings = meta.get("groundings", [])
    if not isinstance(raw_groundings, list):
        raise ShardSampleError(shard, key, "bad_grounding", f"groundings is a {type(raw_groundings).__name__}")
    groundings = []
    for obj in raw_groundings:
        try:
            if not isinstance(obj, dict):
                raise GroundingError(f"grounding {obj!r} is not an object")
            g = Grounding.from_json(obj)
            validate_grounding(g, n, meta["instruction"])
        except GroundingError as exc:
            raise ShardSampleError(shard, key, "bad_grounding", str(exc)) from exc
        groundings.append(g)
    try:
        truth = Truth.from_dict(meta["truth"]) if meta.get("truth") is not None else None
    except TruthError as exc:
        raise ShardSampleError(shard, key, "bad_json", str(exc)) from exc
    sample = Sample(
        key=key,
        references=references,
        instruction=meta["instruction"],
        groundings=groundings,
        target=target,
        task_type=str(meta.get("task_type") or "multi_character"),
        truth=truth,
    )
    try:
        sample.validate()
    except GroundingError as exc:
        raise ShardSampleError(shard, key, "bad_sample", str(exc)) from exc
    sample.conditioning = _read_cache(shard, key, record, sample)
    return sample


def _read_cache(shard: str, key: str, record: dict[str, Any], sample: Sample) -> Any:
    """Cached conditioning if present and still matching the sample; a stale or broken entry is dropped, not fatal."""
    try:
        cache = CachedConditioning.from_members(record)
    except (KeyError, ValueError, OSError) as exc:
        log.warning("shard %s: sample %r: unreadable cached conditioning (%s); encoding online", shard, key, exc)
        return None
    if cache is not None and not matches_sample(cache, sample):
        log.warning("shard %s: sample %r: cached conditioning does not match its instruction/images; encoding online",
                    shard, key)
        return None
    return cache


@dataclass
class ReadStats:
    """Counts of what a reader yielded and skipped, in this process (each DataLoader worker has its own)."""

    good: int = 0
    skipped: Counter = field(default_factory=Counter)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    max_events: int = 1000

    @property
    def bad(self) -> int:
        return sum(self.skipped.values())

    def record(self, shard: str, key: str, kind: str, reason: str) -> None:
        self.skipped[kind] += 1
        if len(self.events) < self.max_events:
            self.events.append((shard, key, reason))


class _BadDataReporter:
    """Turns every failure (tar-level or per-sample) into one warning, one count and one callback."""

    def __init__(self, urls: list[str], on_error: Callable[[str, str, str], None] | None):
        self.urls = set(urls)
        self.on_error = on_error
        self.stats = ReadStats()
        self.last_key: dict[str, str] = {}
        self._last_tar_error: str | None = None
        self._truncated: str | None = None

    def report(self, shard: str, key: str, kind: str, detail: str) -> None:
        reason = f"{kind}: {detail}"
        self.stats.record(shard, key, kind, reason)
        log.warning("skipping bad data in shard %s, sample %s: %s", shard, key, reason)
        if self.on_error is not None:
            self.on_error(shard, key, reason)

    def tar_handler(self, exn: BaseException) -> bool:
        """webdataset handler for errors below the sample level (unreadable or truncated tar): log, go on."""
        shard = next((a for a in reversed(exn.args) if isinstance(a, str) and a in self.urls), None)
        if shard is None:
            shard = next((u for u in self.urls if any(isinstance(a, str) and u in a for a in exn.args)), "<unknown shard>")
        if self._last_tar_error == shard:
            return True  # the same truncation surfaces twice (member read, then next header)
        self._last_tar_error = shard
        if self._truncated == shard and not isinstance(exn, OSError):
            return True  # already reported by the end-of-archive check
        last = self.last_key.get(shard)
        key = f"<after {last}>" if last else "<no sample read>"
        if isinstance(exn, OSError) and exn.strerror:
            kind, message = "unreadable_shard", f"{type(exn).__name__}: {exn.strerror}"
        else:
            first = str(exn.args[0]).split(" @ ")[0] if exn.args else ""
            truncated = any(w in first.lower() for w in ("unexpected end", "truncated", "eof"))
            kind, message = ("truncated_tar" if truncated else "tar_error"), f"{type(exn).__name__}: {first}"
        self.report(shard, key, kind, f"{message}; the rest of this shard is skipped")
        return True

    def note_shards(self, shards: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """A shard is pulled only after the previous one is done, so each read gets its own report.

        A tar cut at a member boundary reads as a shorter, valid archive; only its missing
        end-of-archive marker gives it away, so local ``.tar`` files are checked for it here.
        """
        for shard in shards:
            self._last_tar_error = None
            url = str(shard.get("url"))
            problem = _tar_tail_problem(url)
            if problem is not None:
                self.report(url, "<end of shard>", "truncated_tar", f"{problem}; samples after the cut are lost")
                self._last_tar_error = url  # the read error that follows is the same truncation
                self._truncated = url
            else:
                self._truncated = None
            yield shard

    def note_keys(self, records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for rec in records:
            self._last_tar_error = None
            self.last_key[str(rec.get("__url__"))] = str(rec.get("__key__"))
            yield rec

    def convert(self, records: Iterable[dict[str, Any]]) -> Iterator[Sample]:
        for rec in records:
            try:
                sample = sample_from_wds(rec)
            except ShardSampleError as exc:
                self.report(exc.shard, exc.key, exc.kind, exc.detail)
                continue
            except Exception as exc:  # never let one record end the stream
                self.report(str(rec.get("__url__")), str(rec.get("__key__")), "bad_sample", repr(exc))
                continue
            self.stats.good += 1
            yield sample


def iter_shard_samples(
    urls: str | list[str],
    *,
    resampled: bool = False,
    shuffle: int = 0,
    split_by_node: bool = True,
    split_by_worker: bool = True,
    on_error: Callable[[str, str, str], None] | None = None,
    seed: int = 0,
) -> wds.DataPipeline:
    """Stream :class:`Sample` objects from shards, skipping bad data with a warning instead of crashing.

    ``urls``: a path, a brace pattern (``dir/shard-{000000..000009}.tar``) or a list.
    ``resampled``: draw shards with replacement forever (training; bound the epoch with
    ``.with_epoch(n)`` so every rank runs the same number of steps); rank and worker
    splitting are then skipped, since every rank and worker draws on its own.
    ``shuffle``: sample shuffle buffer (0: keep shard order; validation/test).
    ``on_error(shard, key, reason)`` is called for every skipped sample or unreadable
    shard; counts are on the returned pipeline's ``stats`` (:class:`ReadStats`).
    ``seed`` fixes every random choice of this pipeline (shards drawn, shard and sample
    shuffles): webdataset otherwise seeds them from the clock, the pid and ``os.urandom``,
    and a run could be neither repeated nor resumed exactly. A caller reading from several
    ranks, workers or epochs passes a different seed for each (see
    :func:`cag.data.datamodule.reader_seed`).
    """
    url_list = [u for spec in ([urls] if isinstance(urls, str) else urls) for u in wds.shardlists.expand_urls(str(spec))]
    if not url_list:
        raise ValueError(f"no shard urls in {urls!r}")
    reporter = _BadDataReporter(url_list, on_error)
    stages: list[Any] = []
    if resampled:
        # deterministic=True drops the pid/clock/urandom terms; worker_seed replaces webdataset's
        # rank*1000+worker term, because the caller's seed already says which reader this is
        stages.append(wds.ResampledShards(url_list, seed=seed, deterministic=True, worker_seed=lambda: 0))
    else:
        stages.append(wds.SimpleShardList(url_list))
        if split_by_node:
            stages.append(wds.split_by_node)
        if split_by_worker:
            stages.append(wds.split_by_worker)
        if shuffle > 0:
            stages.append(wds.shuffle(min(len(url_list), 100), seed=seed))
    stages.append(reporter.note_shards)
    stages.append(wds.tarfile_to_samples(handler=reporter.tar_handler))
    stages.append(reporter.note_keys)
    if shuffle > 0:
        stages.append(wds.shuffle(shuffle, seed=seed + 1))
    stages.append(reporter.convert)
    pipeline = wds.DataPipeline(*stages)
    pipeline.stats = reporter.stats  # type: ignore[attr-defined]
    return pipeline
