"""--rows: a study runs only the rows asked for (in the study's order), and an unknown label stops it
before anything trains."""

from __future__ import annotations

import pytest

from experiments import pipeline, table2


def test_rows_run_only_the_named_configurations_in_the_studys_order(monkeypatch, tmp_path):
    seen = {}

    def fake_run_pipeline(args, *, configs, **_):
        seen["labels"] = [c.label for c in configs]
        return []

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run_pipeline)
    table2.main(["--rows", "ablation_mask,baseline", "--from-scratch", "--out", str(tmp_path)])
    assert seen["labels"] == ["baseline", "ablation_mask"]
    table2.main(["--from-scratch", "--out", str(tmp_path)])
    assert seen["labels"] == ["baseline", "ablation_mask", "ablation_dropout", "cag"]


@pytest.mark.parametrize("rows", ["baseline,masked", ","])
def test_an_unknown_row_stops_before_training_and_names_the_label(monkeypatch, tmp_path, capsys, rows):
    monkeypatch.setattr(pipeline, "run_pipeline", lambda *a, **k: pytest.fail("nothing may run"))
    with pytest.raises(SystemExit):
        table2.main(["--rows", rows, "--from-scratch", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "--rows" in err and "ablation_mask" in err  # the labels that exist are listed
    if rows != ",":
        assert "masked" in err.split("not among")[0]


def test_the_ladder_honours_rows_too_instead_of_ignoring_them(monkeypatch, tmp_path):
    """The ladder shares the studies' arguments; a --rows it accepted and ignored would train every level."""
    from experiments import ladder

    seen = {}
    monkeypatch.setattr(pipeline, "run_pipeline", lambda args, *, configs, **_: seen.setdefault(
        "labels", [c.label for c in configs]) and [])
    ladder.main(["--levels", "0,3", "--rows", "level 3", "--out", str(tmp_path)])
    assert seen["labels"] == ["level 3"]
    monkeypatch.setattr(pipeline, "run_pipeline", lambda *a, **k: pytest.fail("nothing may run"))
    with pytest.raises(SystemExit):
        ladder.main(["--levels", "0,3", "--rows", "level 2", "--out", str(tmp_path)])
