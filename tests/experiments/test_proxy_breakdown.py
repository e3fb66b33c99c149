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


def _slot_binder(folder: Path, n: int, record: bool) -> list[bool]:
    """A run that binds by reference slot: bound when the references stand left to right, else swapped."""
    from cag.data.synthetic import SyntheticConfig, generate_sample, position_x

    in_order = []
    for i in range(n):
        xs = [position_x(p.position) for p in generate_sample("test", i, SyntheticConfig()).truth.subjects]
        in_order.append(xs == sorted(xs))
    _results_for(folder, ["bound" if o else "swapped" for o in in_order])
    if record:
        data = {"source": "synthetic", "split": "test", "synthetic": {"image_size": 128, "num_characters": 2, "seed": 0,
                                                                        "place": "text", "shot": "text",
                                                                        "describe_colours": True}}
        (folder / "run_info.json").write_text(json.dumps({"data": data}))
    return in_order


def _results_for(folder: Path, outcomes: list[str]) -> None:
    folder.mkdir(parents=True)
    lines = [json.dumps({"key": f"test-{i:06d}", "scores": {"proxy_pf": 5.0, "proxy_sc": 4.0, "proxy_overall": 4.5},
                         "details": {"proxy": {"parts": {"pf_subjects": 0.2, "pf_props": 0.9, "sc_subjects": 0.1,
                                                         "sc_scene": 0.8}, "binding": {"A": o, "B": o}}}})
             for i, o in enumerate(outcomes)]
    (folder / "results.jsonl").write_text("\n".join(lines) + "\n")


def test_by_slot_order_shows_a_run_that_binds_by_slot_instead_of_reading_the_text(tmp_path, capsys):
    from experiments.proxy_breakdown import main

    in_order = _slot_binder(tmp_path / "slot", 12, record=True)
    assert 0 < sum(in_order) < 12, "today's benchmark draws both orders"
    main([str(tmp_path / "slot"), "--by-slot-order"])
    rows = {line.split(" | ")[0].lstrip("| "): line for line in capsys.readouterr().out.splitlines() if "slot:" in line}
    ordered, other = rows["slot: references left to right"], rows["slot: references in another order"]
    assert f"| {sum(in_order)} |" in ordered and f"| {12 - sum(in_order)} |" in other
    # bound | swapped | missing: all bound in order, all swapped otherwise
    assert ordered.rstrip(" |").endswith("1.00 [1.00, 1.00] | 0.00 [0.00, 0.00] | 0.00 [0.00, 0.00]")
    assert other.rstrip(" |").endswith("0.00 [0.00, 0.00] | 1.00 [1.00, 1.00] | 0.00 [0.00, 0.00]")


def test_by_slot_order_needs_the_benchmark_recorded_or_named(tmp_path, capsys):
    from experiments.proxy_breakdown import main

    _slot_binder(tmp_path / "bare", 4, record=False)
    with pytest.raises(SystemExit, match="bare.*--synthetic"):
        main([str(tmp_path / "bare"), "--by-slot-order"])
    main([str(tmp_path / "bare"), "--by-slot-order", "--synthetic", "level3"])
    assert "bare: references left to right" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="level9"):
        main([str(tmp_path / "bare"), "--by-slot-order", "--synthetic", "level9"])


def test_comma_joined_seeds_are_one_configuration_whose_interval_covers_the_seeds(tmp_path, capsys):
    """Two seeds that disagree completely (one binds every subject, one swaps every subject) give a bound
    rate of 0.5 whose interval spans both seeds, as a new training seed could land on either; pooling the
    eight samples as if one run would give a narrow interval around 0.5."""
    from experiments.proxy_breakdown import main

    every = {f"test-{i:06d}" for i in range(4)}
    a0 = _results(tmp_path / "a0", every, 0.3)
    a1 = _results(tmp_path / "a1", set(), 0.3)
    b0 = _results(tmp_path / "b0", set(), 0.0)
    b1 = _results(tmp_path / "b1", set(), 0.0)
    main([f"{a0},{a1}", f"{b0},{b1}", "--labels", "A,B", "--paired"])
    out = capsys.readouterr().out.splitlines()
    row_a = next(line for line in out if line.startswith("| A |"))
    assert "| 2 seeds × 4 |" in row_a
    bound = row_a.split(" | ")[-3]  # bound | swapped | missing
    assert bound == "0.50 [0.00, 1.00]"
    paired = next(line for line in out if line.startswith("| A − B |"))
    assert "| 2 seeds × 4 |" in paired
    assert paired.split(" | ")[-3] == "+0.50 [+0.00, +1.00]"  # bound: seed 0 of A against seed 0 of B, 1 with 1
    assert "+3.00 [+3.00, +3.00]" in paired  # subjects PF: the same on both seeds
    with pytest.raises(ValueError, match="2 seeds against 1"):
        main([f"{a0},{a1}", str(b0), "--labels", "A,B", "--paired"])


def test_a_configuration_keeps_only_the_samples_every_seed_scored(tmp_path):
    from experiments.proxy_breakdown import read_config

    a0 = _results(tmp_path / "a0", {"test-000000"}, 0.0)
    a1 = _results(tmp_path / "a1", {"test-000000"}, 0.0)
    lines = (a1 / "results.jsonl").read_text().splitlines()
    (a1 / "results.jsonl").write_text("\n".join(lines[1:]) + "\n")  # seed 1 lacks sample 0
    values = read_config([a0, a1])
    assert values["keys"].tolist() == ["test-000001", "test-000002", "test-000003"]
    assert values["bound"].shape == (2, 3) and not values["bound"].any()  # the only bound sample left out


def test_two_sweep_rows_whose_seed_folders_share_names_stay_two_configurations(tmp_path, capsys):
    """A sweep writes eval/<row>/seed<k>: the default labels take parent folders until they differ, so both
    rows are printed and paired (keyed by the bare folder name, the second row used to replace the first)."""
    from experiments.proxy_breakdown import main

    every = {f"test-{i:06d}" for i in range(4)}
    a0 = _results(tmp_path / "eval" / "masked" / "seed0", every, 0.3)
    b0 = _results(tmp_path / "eval" / "full" / "seed0", set(), 0.0)
    main([str(a0), str(b0), "--paired"])
    out = capsys.readouterr().out
    assert "| masked/seed0 |" in out and "| full/seed0 |" in out
    assert "| masked/seed0 − full/seed0 |" in out
    with pytest.raises(SystemExit, match="'A' names more than one"):
        main([str(a0), str(b0), "--labels", "A,A"])
