"""LightningDataModule: synthetic, shard or manifest samples -> model-ready batches.

Resize policy and batch layout: :mod:`cag.data.batching` (targets and references at
``image_size``, the VLM's copies of the references at ``vlm_image_size``).

Training streams are infinite and cut into epochs of ``epoch_batches`` batches per rank,
so every DDP rank runs the same number of steps (webdataset's ``with_epoch`` idea, here
applied after bucketing). Validation is a deterministic single pass.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset
from webdataset.shardlists import expand_urls
from webdataset.utils import make_seed, pytorch_worker_info

from cag.data.batching import bucket_batches, collate
from cag.data.sample import GroundingError, Sample
from cag.data.shards import iter_shard_samples
from cag.data.sources import SampleSource
from cag.data.synthetic import generate_sample
from cag.utils.plain import plain

log = logging.getLogger(__name__)

def reader_role(skip_batches: int = 0) -> tuple[int, int, int, int]:
    """(rank, world size, worker role, workers): which part of an epoch's stream this reader produces.

    Why a role rather than the worker id: the DataLoader takes batches round-robin starting at
    worker 0, so in an epoch read from its start, worker ``w`` makes the epoch's batches
    ``w, w + n, ...``. A run resumed after ``skip_batches`` batches must hand over batch
    ``skip_batches`` first, which belongs to worker ``skip_batches % n``; so worker ``w`` of the
    resumed loader plays worker ``(w + skip_batches) % n``'s part (its samples, its shard seed,
    its batches). With ``skip_batches`` a multiple of ``n`` (or one worker) role and id coincide.
    """
    rank, world, worker, num_workers = pytorch_worker_info()
    return rank, world, (worker + skip_batches) % num_workers, num_workers


def reader_seed(seed: int, epoch: int, skip_batches: int = 0) -> int:
    """Seed of this reader's shard stream: a function of (run seed, epoch, rank, worker role) only.

    The same inputs give the same shard draws and sample shuffle, so a run repeats, and a
    resumed run regenerates the interrupted epoch's stream and skips what it already
    trained on (as the synthetic and manifest sources do with their epoch order).
    """
    rank, _, role, _ = reader_role(skip_batches)
    return make_seed(int(seed), int(epoch), rank, role)


class SampleStream(IterableDataset):
    """Yields collated batches; each rank x worker reads a disjoint part of the source."""

    def __init__(self, dm: CAGDataModule, split: str, train: bool) -> None:
        super().__init__()
        self.dm, self.split, self.train = dm, split, train
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Place the training stream at batch ``skip_batches`` of data epoch ``epoch`` (the data module's position).

        Training moves the position itself; this is for reading a stream by hand.
        """
        self.dm.position = (int(epoch), int(skip_batches))

    def _samples(self) -> Iterator[Sample]:
        dm = self.dm
        rank, world, role, workers = reader_role(self.skip_batches if self.train else 0)
        me, readers = rank * workers + role, world * workers  # as webdataset splits shards over ranks x workers
        if dm.source == "synthetic":
            cfg = dm.sample_source.synthetic
            for i in self._indices(dm.train_samples if self.train else dm.val_samples, me, readers):
                yield generate_sample(self.split, i, cfg)
        elif dm.source == "shards":
            urls = dm.urls if self.train else dm.val_urls
            n_shards = len([u for spec in ([urls] if isinstance(urls, str) else urls) for u in expand_urls(str(spec))])
            if not self.train and n_shards < readers and me == 0:
                log.warning("%d validation shard(s) for %d readers (ranks x workers): some readers get no data; "
                            "write at least %d shards", n_shards, readers, readers)
            pipeline = iter_shard_samples(
                urls,
                resampled=self.train,
                shuffle=dm.shuffle_buffer if self.train else 0,
                split_by_node=True,
                split_by_worker=True,
                on_error=dm.record_skip,
                seed=reader_seed(dm.seed, self.epoch, self.skip_batches) if self.train else dm.seed,
            )
            self._stats = pipeline.stats
            yield from pipeline
        else:  # manifest: validated up front in setup()
            for i in self._indices(len(dm.manifest_samples), me, readers):
                yield dm.manifest_samples[i]

    def _indices(self, n: int, me: int, readers: int) -> Iterator[int]:
        """This reader's share of ``0 .. n-1``: reshuffled every pass, endlessly, for training
        (the order a function of seed and epoch, so a resumed run repeats it); once, in order, for validation."""
        if self.train:
            rng = random.Random(self.dm.seed * 1000 + self.epoch)
            order: Iterator[int] = itertools.chain.from_iterable(rng.sample(range(n), n) for _ in itertools.count())
        else:
            order = iter(range(n))
        return (i for j, i in enumerate(order) if j % readers == me)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dm = self.dm
        # an iterator starts where training stands: a fresh epoch, or mid-epoch after a resume. Read here,
        # when the loader starts an epoch (in the main process, or the copy each worker gets)
        self.epoch, self.skip_batches = dm.position if self.train else (0, 0)
        self._stats = None
        reported = 0
        batches = bucket_batches(self._samples(), dm.batch_size, drop_last=self.train)
        if self.train:
            # the epoch's batch b comes from role b % n; this reader skips what its role already made
            _, _, role, nw = reader_role(self.skip_batches)
            per_worker = dm.batches_per_epoch() // nw
            done = len(range(role, self.skip_batches, nw))
            batches = itertools.islice(batches, done, per_worker)
        for b in batches:
            batch = collate(b, dm.image_size, dm.vlm_image_size)
            # skips happen in worker processes: their count travels with the batches
            bad = self._stats.bad if self._stats is not None else 0
            batch["data_skipped"] = bad - reported
            reported = bad
            yield batch


class CAGDataModule(L.LightningDataModule):
    """Data for training/validation; ``source`` = synthetic (default), shards, or manifest."""

    def __init__(
        self,
        source: str = "synthetic",
        image_size: int = 64,
        vlm_image_size: int = 64,
        batch_size: int = 4,
        num_workers: int = 0,
        epoch_batches: int = 100,
        seed: int = 0,
        train_samples: int = 512,
        val_samples: int = 16,
        synthetic: dict[str, Any] | None = None,
        urls: str | list[str] | None = None,
        val_urls: str | list[str] | None = None,
        shuffle_buffer: int = 256,
        manifest: str | None = None,
        val_manifest: str | None = None,
    ) -> None:
        super().__init__()
        # the rule every entry point shares for which sources exist and what each needs (names the missing key)
        self.sample_source = SampleSource.from_config(
            {"source": source, "synthetic": synthetic, "urls": urls, "manifest": manifest}
        )
        self.source = source
        self.image_size, self.vlm_image_size = image_size, vlm_image_size
        self.batch_size, self.num_workers, self.epoch_batches = batch_size, num_workers, epoch_batches
        self.seed, self.train_samples, self.val_samples = seed, train_samples, val_samples
        self.synthetic = plain(synthetic or {})
        self.urls, self.val_urls = urls, val_urls or urls
        self.shuffle_buffer = shuffle_buffer
        self.manifest, self.val_manifest = manifest, val_manifest
        self.manifest_samples: list[Sample] = []
        self.skipped: list[tuple[str, str, str]] = []
        # (data epoch, training batches of it handed to the model); always short of a whole epoch
        self.position = (0, 0)

    def transfer_batch_to_device(self, batch: dict[str, Any], device: torch.device, dataloader_idx: int) -> dict[str, Any]:
        """Only pixel tensors travel; PIL images and groundings stay on the host for the VLM processor.

        Defined here, with the batch layout it depends on, rather than on the LightningModule:
        Lightning warns on every run when the module overrides it while a data module is used.
        """
        out = dict(batch)
        out["ref_pixels"] = [p.to(device) for p in batch["ref_pixels"]]
        if "target_pixels" in batch:
            out["target_pixels"] = batch["target_pixels"].to(device)
        return out

    def batches_per_epoch(self) -> int:
        """Training batches per rank in one epoch: ``epoch_batches`` cut to a multiple of the loader workers
        (each worker makes the same number, at least one)."""
        workers = max(1, self.num_workers)
        return max(1, self.epoch_batches // workers) * workers

    def record_skip(self, shard: str, key: str, reason: str) -> None:
        self.skipped.append((shard, key, reason))

    def setup(self, stage: str | None = None) -> None:
        if self.source == "manifest" and not self.manifest_samples:
            self.manifest_samples = list(self.sample_source.samples())
            for s in self.manifest_samples:
                try:
                    s.validate()
                except GroundingError as exc:
                    raise GroundingError(f"{self.manifest}: {exc}") from exc

    def _loader(self, split: str, train: bool) -> DataLoader:
        return DataLoader(
            SampleStream(self, split, train),
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
            # its own generator: creating iterators must not consume the training RNG (exact resume)
            generator=torch.Generator().manual_seed(self.seed),
        )

    # Mid-epoch resume through Lightning's public data-module hooks: state_dict() is stored in
    # every checkpoint, load_state_dict() runs before the training loader is iterated when a run
    # resumes. The position counts batches handed to the model, not batches the loader produced,
    # because Lightning fetches one batch ahead of the one it trains on. The data epoch is the
    # data module's own count (every epoch is batches_per_epoch() batches), not Lightning's epoch:
    # a run stopped on an epoch's last batch resumes with Lightning's counter one epoch ahead.

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        trainer = self.trainer
        if trainer is not None and trainer.training:
            self.position = self._normalised(self.position[0], self.position[1] + 1)
        return batch

    def _normalised(self, epoch: int, done: int) -> tuple[int, int]:
        per_epoch = self.batches_per_epoch()
        return epoch + done // per_epoch, done % per_epoch

    def state_dict(self) -> dict[str, Any]:
        epoch, done = self.position
        return {"epoch": epoch, "batches_done": done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.position = self._normalised(int(state_dict["epoch"]), int(state_dict["batches_done"]))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val" if self.source == "synthetic" else "train", False)
