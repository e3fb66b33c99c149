"""Mid-epoch data position: a resumed loader hands over exactly the batches the interrupted epoch had left.

The DataLoader takes batches from its workers round-robin, always starting at worker 0, so a
stop after an odd number of batches with two workers used to resume with the next two batches
exchanged (issue: "Mid-epoch resume on shards is exact only when the stop lands on an even step").
These tests compare, for every stop position of an epoch (first batch, odd, even, last, the
end), every supported worker count and two ranks, the resumed loader's batch keys with the rest
of the uninterrupted epoch's.
"""

from __future__ import annotations

import pytest

from cag.data.datamodule import CAGDataModule
from cag.data.shards import write_shards
from cag.data.synthetic import SyntheticConfig, generate_split
from tests.manifests import write_training_manifest

EPOCH_BATCHES = 7  # odd: with 2 or 3 workers the epoch is cut to a multiple of the worker count
SYN = {"image_size": 64, "num_characters": 1, "seed": 0}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, dict]:
    """Keyword arguments of a data module for each source, all over the same 24 small samples."""
    root = tmp_path_factory.mktemp("resume_position")
    samples = list(generate_split("train", 24, SyntheticConfig(**SYN)))
    summary = write_shards(samples, str(root / "shards" / "shard-%06d.tar"), maxcount=3)
    manifest = write_training_manifest(samples, root / "manifest")
    return {
        "synthetic": {"source": "synthetic", "synthetic": SYN, "train_samples": 24},
        "shards": {"source": "shards", "urls": summary.shards, "shuffle_buffer": 4},
        "manifest": {"source": "manifest", "manifest": str(manifest)},
    }


def _epoch(kwargs: dict, workers: int, epoch: int, skip: int) -> list[list[str]]:
    dm = CAGDataModule(image_size=64, vlm_image_size=32, batch_size=2, num_workers=workers,
                       epoch_batches=EPOCH_BATCHES, seed=5, **kwargs)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.dataset.set_epoch(epoch, skip)
    return [list(batch["keys"]) for batch in loader]


@pytest.mark.parametrize("rank", [None, 1], ids=["one-rank", "rank1-of-2"])
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
@pytest.mark.parametrize("source", ["synthetic", "shards", "manifest"])
def test_a_resumed_epoch_hands_over_the_batches_the_interrupted_one_had_left(sources, monkeypatch, source, workers, rank):
    if rank is not None:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
    full = _epoch(sources[source], workers, epoch=1, skip=0)
    assert len(full) == EPOCH_BATCHES // max(workers, 1) * max(workers, 1)
    assert len({k for batch in full for k in batch}) > 2  # the batches differ, so an exchange would show
    for skip in range(1, len(full) + 1):  # the first batch, odd and even stops, the last batch, the epoch's end
        assert _epoch(sources[source], workers, epoch=1, skip=skip) == full[skip:], f"stopped after {skip} batches"
