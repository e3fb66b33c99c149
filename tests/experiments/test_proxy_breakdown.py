"""experiments/proxy_breakdown.py: parts and binding per run, and the paired difference of two runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.proxy_breakdown import breakdown_table, paired_table, read_parts


def _results(folder: Path, bound_keys: set[str], shift: float) -> Path:
    """Four two-subject samples: subjects bound where the key is in ``bound_keys``, else swapped."""
    folder.mkdir(parents=True)
    lines = []
    for i in range(4):
        key = f"test-{i:06d}"
        outcome = "bound" if key in bound_keys else "swapped"
        proxy = {"parts": {"pf_subjects": 0.2 + shift, "pf_props": 0.9, "sc_subjects": 0.1, "sc_scene": 0.8},
                 "binding": {"A": outcome, "B": outcome}}
        lines.append(json.dumps({"key": key, "scores": {"proxy_pf": 5.0 + i, "proxy_sc": 4.0, "proxy_overall": 4.5},
                                 "details": {"proxy": proxy}}))
    (folder / "results.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_binding_columns_and_the_paired_difference_on_shared_samples(tmp_path):
    a = read_parts(_results(tmp_path / "a", {"test-000000", "test-000001", "test-000002", "test-000003"}, 0.3))
    b = read_parts(_results(tmp_path / "b", {"test-000000"}, 0.0))
    table = breakdown_table({"a": a, "b": b})
    assert "| a | 4 |" in table and "1.00 [1.00, 1.00]" in table  # a binds every subject
    assert "0.25 [" in table  # b binds one sample of four
    paired = paired_table(a, b, "a − b")
    row = paired.splitlines()[-1]
    assert row.startswith("| a − b | 4 |")
    assert "+3.00 [+3.00, +3.00]" in row  # subjects PF 10 x (0.5 - 0.2) on every sample
    assert "+0.75 [" in row  # bound: three more samples of four
    with pytest.raises(ValueError, match="no test sample key"):
        paired_table(a, {**b, "keys": b["keys"].astype(str) + "x"}, "none")
