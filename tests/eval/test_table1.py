"""experiments/table1.py: Table 1 across methods from MLflow evaluation runs, with bootstrap CIs and coverage."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest

from experiments import table1

ROOT = Path(__file__).resolve().parents[2]


def _eval_run(
    client,
    exp: str,
    tmp: Path,
    method: str | None,
    scores: list[dict],
    *,
    prefix: str = "eval",
    task_types: list[str] | None = None,
    artifact: bool = True,
    metrics: dict | None = None,
    skipped: tuple[str, ...] = (),
) -> str:
    tags = {"metric_prefix": prefix, "mlflow.runName": f"{prefix}:{method or 'unnamed'}"}
    if method is not None:
        tags["method"] = method
    for title in skipped:
        tags[f"skipped/{title}"] = "not configured"
    run = client.create_run(exp, tags=tags)
    rid = run.info.run_id
    if artifact:
        path = tmp / rid / "results.jsonl"
        path.parent.mkdir(parents=True)
        with path.open("w") as fh:
            for i, sc in enumerate(scores):
                tt = task_types[i] if task_types else "default"
                fh.write(
                    json.dumps({"key": f"k{i:03d}", "task_type": tt, "instruction": "", "scores": sc}) + "\n"
                )
        client.log_artifact(rid, str(path))
    for k, v in (metrics or {}).items():
        client.log_metric(rid, k, v)
    client.set_terminated(rid, "FINISHED")
    return rid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One tracking store for the module: creating a sqlite store (schema migrations) costs seconds."""
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    return uri, mlflow.tracking.MlflowClient(uri), tmp


def _experiment(store, name: str) -> str:
    uri, client, tmp = store
    return client.create_experiment(name, artifact_location=str(tmp / name))


def test_rows_have_bootstrap_cis_coverage_and_paper_reference_rows(tmp_path, store):
    uri, client, _ = store
    exp = _experiment(store, "cag-eval")
    rng = np.random.default_rng(0)
    n = 60
    pf = rng.uniform(2, 9, n)
    sc = rng.uniform(3, 10, n)
    types = ["a" if i % 3 else "b" for i in range(n)]
    ours = [
        {
            "pf": float(p),
            "sc": float(s),
            "overall": math.sqrt(p * s),
            "dino": 0.5,
            "clip_i": None,
            "clip_t": None,
            "proxy_pf": 1.0,
            "proxy_sc": 2.0,
            "proxy_overall": math.sqrt(2.0),
        }
        for p, s in zip(pf, sc, strict=True)
    ]
    ours[0]["pf"] = ours[0]["overall"] = None  # a failed judge call: not scored, counted
    _eval_run(client, exp, tmp_path, "cag-tiny", [{"pf": 0.0}] * n)  # older run of the same method: replaced
    _eval_run(client, exp, tmp_path, "cag-tiny", ours, task_types=types, skipped=("CLIP-I", "CLIP-T"))
    ext = [{"pf": 5.0, "sc": 5.0, "overall": 5.0} for _ in range(40)] + [
        {"pf": None, "sc": None, "overall": None}
    ] * 20
    _eval_run(client, exp, tmp_path, "UNO-like", ext)
    _eval_run(
        client, exp, tmp_path, "cag-tiny", [{"pf": 9.0}] * n, prefix="eval_noref"
    )  # Table 3 setting: not here
    _eval_run(client, exp, tmp_path, "no-artifact", [], artifact=False, metrics={"PF": 4.5, "SC": 4.0})

    rows, files = table1.build_table1(uri, tmp_path / "out", n_boot=500)
    by = {r.method: r for r in rows}
    assert [r.method for r in rows][:4] == [
        "cag-tiny",
        "cag-tiny (judge-free proxy)",
        "UNO-like",
        "no-artifact",
    ]

    # point estimate = the evaluation's statistic: per task type mean, then over task types
    pf_scored = np.array([np.nan, *pf[1:]])
    want = np.mean([np.nanmean(pf_scored[[t == g for t in types]]) for g in ("a", "b")])
    cell = by["cag-tiny"].cells["pf"]
    assert cell.mean == pytest.approx(want) and cell.lo < want < cell.hi and cell.hi - cell.lo < 2.0
    assert (cell.scored, cell.total) == (n - 1, n)
    assert by["cag-tiny"].cells["clip_i"].mean is None and by["cag-tiny"].cells["dino"].mean == pytest.approx(
        0.5
    )
    assert by["cag-tiny (judge-free proxy)"].cells["sc"].mean == pytest.approx(2.0)
    uno = by["UNO-like"].cells["pf"]
    assert (uno.mean, uno.lo, uno.hi, uno.scored, uno.total) == (5.0, 5.0, 5.0, 40, 60)
    assert by["no-artifact"].cells["pf"].mean == 4.5 and by["no-artifact"].cells["pf"].lo is None

    md = files[0].read_text()
    assert "| Method | PF | SC | Overall | DINO | CLIP-I | CLIP-T | Coverage |" in md
    assert "PF 40/60, SC 40/60, Overall 40/60" in md and "PF 59/60" in md
    paper = {r.method: r for r in rows if r.kind == "paper"}
    assert paper["CAG (paper, reported)"].cells["overall"].mean == 7.568
    assert paper["UNO (paper, reported)"].cells["clip_t"].mean == 0.245
    assert (
        "| Qwen-Image-Edit-2509 (paper, reported) | 5.890 | 6.613 | 6.178 | 0.496 | 0.701 | 0.317 | — |" in md
    )
    assert "not measured here" in md
    with files[1].open() as fh:
        csv_rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert float(csv_rows["cag-tiny"]["PF_lo"]) == pytest.approx(cell.lo, rel=1e-5)
    assert csv_rows["UNO-like"]["PF_scored"] == "40" and csv_rows["UNO-like"]["source"] == "checkpoint"

    # fixed bootstrap seed: the same store gives the same table; the table is logged to MLflow
    again, _ = table1.build_table1(uri, tmp_path / "out2", n_boot=500, log_to_mlflow=False)
    assert [vars(c) for c in again[0].cells.values()] == [vars(c) for c in rows[0].cells.values()]
    logged = client.search_runs([client.get_experiment_by_name("cag-experiments").experiment_id])
    assert len(logged) == 1 and {a.path for a in client.list_artifacts(logged[0].info.run_id)} == {
        "table1.md",
        "table1.csv",
        "table1.json",
    }


def test_methods_are_chosen_and_ordered_on_request_and_unknown_ones_named(tmp_path, store):
    uri, client, _ = store
    exp = _experiment(store, "other-eval")
    _eval_run(client, exp, tmp_path, "A", [{"pf": 1.0}])
    _eval_run(
        client, exp, tmp_path, None, [{"pf": 2.0}]
    )  # no method tag (runs from before the tag): label from the run name
    rows, _ = table1.build_table1(
        uri,
        tmp_path / "o",
        methods=["unnamed", "A"],
        paper=False,
        n_boot=50,
        log_to_mlflow=False,
        experiment="other-eval",
    )
    assert [r.method for r in rows] == ["unnamed", "A"] and all(r.kind != "paper" for r in rows)
    with pytest.raises(SystemExit, match="'B'"):
        table1.build_table1(uri, tmp_path / "o", methods=["B"], log_to_mlflow=False, experiment="other-eval")
