"""experiments/gpu_check.py: its CPU smoke mode runs both parts, and it refuses cleanly without CUDA."""

from __future__ import annotations

import torch

from experiments import gpu_check


def test_cpu_smoke_mode_times_every_attention_mode_and_trains_the_tiny_default(capsys):
    assert gpu_check.main(["--device", "cpu", "--small", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "[part 1] device cpu" in out and "joint tokens 256" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ") and len(line.split()) == 6}
    assert set(rows) >= {"full", "masked", "dense", "masked+ckpt"}
    assert all(float(r[1]) > 0 and float(r[3]) > 0 for r in rows.values())
    assert "masked/full = " in out
    assert "[part 2] tiny default, trainer=cpu" in out and "2 steps" in out


def test_asking_for_cuda_without_a_device_exits_with_a_clear_message(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--device cpu --small" in err
