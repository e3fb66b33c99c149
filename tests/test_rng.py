"""Checkpoints carry the generator of the device that trains, not only the CPU one.

The CUDA path is exercised here on a CPU machine by standing in for ``torch.cuda``'s state
functions (what is saved, and where it is put back); the test marked ``gpu`` checks on a real
GPU that restored state reproduces the same noise.
"""

from __future__ import annotations

import types

import pytest
import torch

from cag import rng
from cag.lightning_module import CAGLightningModule


class FakeCuda:
    """Records the calls ``cag.rng`` makes to ``torch.cuda``'s generator functions."""

    def __init__(self) -> None:
        self.states = {0: torch.tensor([0, 0], dtype=torch.uint8), 1: torch.tensor([7, 1], dtype=torch.uint8)}
        self.set_calls: list[tuple[list[int], int]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.states[int(device)].clone())
        monkeypatch.setattr(torch.cuda, "set_rng_state",
                            lambda state, device="cuda": self.set_calls.append((state.tolist(), int(device))))


def test_checkpoint_holds_the_cuda_generator_of_the_training_device_and_restore_puts_it_back(monkeypatch):
    fake = FakeCuda()
    fake.install(monkeypatch)
    module = types.SimpleNamespace(_training_device=lambda: torch.device("cuda", 1))
    ckpt: dict = {}
    CAGLightningModule.on_save_checkpoint(module, ckpt)  # type: ignore[arg-type]
    assert torch.equal(ckpt[rng.CPU_KEY], torch.get_rng_state())
    assert ckpt[rng.CUDA_KEY].tolist() == [7, 1]  # device 1's generator, not device 0's

    cpu_state = ckpt[rng.CPU_KEY]
    torch.rand(10)  # move the CPU generator on
    rng.restore_rng_state(ckpt, torch.device("cuda", 1))
    assert fake.set_calls == [([7, 1], 1)]
    assert torch.equal(torch.get_rng_state(), cpu_state)


def test_cpu_run_saves_no_cuda_state_and_a_cross_device_resume_says_the_noise_differs(monkeypatch, caplog):
    ckpt = rng.capture_rng_state(torch.device("cpu"))
    assert set(ckpt) == {rng.CPU_KEY}
    fake = FakeCuda()
    fake.install(monkeypatch)
    rng.restore_rng_state(ckpt, torch.device("cuda", 0))
    assert fake.set_calls == [] and "no CUDA generator state" in caplog.text


def test_checkpoints_of_the_old_layout_restore_their_cpu_state():
    state = torch.get_rng_state()
    expected = torch.rand(3)
    rng.restore_rng_state({"torch_rng_state": state}, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_restored_cuda_state_reproduces_the_same_noise_on_the_gpu():
    device = torch.device("cuda", torch.cuda.current_device())
    torch.randn(4, device=device)
    ckpt = rng.capture_rng_state(device)
    expected = torch.randn(1000, device=device)
    torch.randn(1000, device=device)
    rng.restore_rng_state(ckpt, device)
    assert torch.equal(torch.randn(1000, device=device), expected)
