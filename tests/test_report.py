"""The sweep report (`python -m mmprune_exp.report`) on a real sweep of run.py, and on results.json variants."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from mmprune_exp.errors import USER_ERROR_EXIT
from mmprune_exp.report import SCHEMA_VERSIONS, build_report, main, pivot, token_table
from mmprune_exp.tracking import read_offline_run
from tests.sweeps import SWEEP_GROUP, small_sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return small_sweep(tmp_path_factory.getbasetemp() / "small_sweep")


@pytest.fixture(scope="module")
def report(sweep):
    """The report of the sweep, as the command writes it (into <sweep>/report, W&B offline)."""
    assert main([str(sweep)]) == 0
    return sweep / "report"


def job_results(sweep):
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("[0-9]*/results.json")}


def test_the_report_holds_every_job_with_its_results(sweep, report):
    table = pd.read_csv(report / "results.csv", dtype={"job": str})
    assert list(table["job"]) == [str(i) for i in range(8)]  # launch order
    assert list(table["status"]) == ["ok"] * 6 + ["failed", "missing"]
    for job, res in job_results(sweep).items():
        row = table.set_index("job").loc[job]
        assert (row["pruner"], row["sparsity"], row["benchmark"]) == tuple(
            res["choices"][k] for k in ("pruner", "sparsity", "benchmark"))  # fmt: skip
        assert row["score"] == pytest.approx(res["score"]) and row["recovery"] == pytest.approx(res["recovery"])
        assert row["dense_score"] == pytest.approx(res["dense_score"])
        assert row["achieved_sparsity"] == pytest.approx(res["sparsity"])
        assert row["wandb_run_id"] == res["wandb_run_id"]
    failed, missing = table.iloc[6], table.iloc[7]
    assert "model.path='/nonexistent/model' is not a directory" in failed["note"]  # the run's own error line
    assert failed["pruner"] == "sparsegpt" and missing["overrides"] == "pruner=sparsegpt sparsity=s50"


def test_markdown_has_the_results_and_the_recovery_pivot(sweep, report):
    text = (report / "report.md").read_text()
    assert "8 jobs: 6 with results, 2 without." in text
    results = job_results(sweep)
    wanda_s50 = next(r for r in results.values() if r["choices"]["pruner"] == "wanda" and r["choices"]["sparsity"] == "s50")
    header = next(line for line in text.splitlines() if line.startswith("| benchmark"))
    assert [c.strip() for c in header.strip("|").split("|")][:6] == [
        "benchmark", "pruner", "sparsity", "score", "dense_score", "recovery"]  # fmt: skip
    assert f"| shapes_vqa  | wanda     | s50        |  {wanda_s50['score']:.4f} |" in text
    pivot_rows = text.split("## Recovery")[1].split("##")[0]
    assert "| pruner    |    s30 |    s50 |" in pivot_rows
    assert f"| wanda     | {results['4']['recovery']:.4f} | {wanda_s50['recovery']:.4f} |" in pivot_rows
    assert "## Jobs without results" in text and "no results.json" in text
    assert "kept_ratio" not in text  # token_pruner=none in every job: no token columns


def test_plots_are_pngs_with_one_line_per_pruner(report):
    import matplotlib.image

    for name in ("score_vs_sparsity", "recovery_vs_sparsity"):
        image = matplotlib.image.imread(report / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 100
    assert not (report / "accuracy_vs_kept_ratio.png").exists()  # token pruning does not vary here


def test_the_report_logs_its_table_to_the_sweeps_wandb_group(sweep, report):
    (offline,) = (report / "wandb").glob("offline-run-*")
    run = read_offline_run(offline)
    jobs = json.loads((sweep / "0" / "wandb_run.json").read_text())
    assert run.group == jobs["group"] == SWEEP_GROUP and run.job_type == "report" and run.exit_code == 0
    logged = {k: v for step in run.history for k, v in step.items()}
    assert logged["sweep/results/_type"] == "table-file" and logged["sweep/results/nrows"] == 8
    table = json.loads((offline / "files" / logged["sweep/results/path"]).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [r["status"] for r in rows] == ["ok"] * 6 + ["failed", "missing"]
    assert logged["sweep/recovery_vs_sparsity/_type"] == "image-file"
    assert run.summary["jobs_ok"] == 6


def test_rerunning_the_report_keeps_one_wandb_run(sweep, report):
    first = (report / "wandb_id.txt").read_text()
    assert main([str(sweep)]) == 0
    (offline,) = (report / "wandb").glob("offline-run-*")
    assert read_offline_run(offline).run_id == first


# -- results.json variants, built from the sweep's real files ----------------------------------------------


def copy_job(sweep, job, dest, **changes):
    shutil.copytree(sweep / job, dest, ignore=shutil.ignore_patterns("wandb", "wandb_*"))
    res = json.loads((dest / "results.json").read_text())
    for key, value in changes.items():
        if key == "choices":
            res["choices"] |= value
        else:
            res[key] = value
    (dest / "results.json").write_text(json.dumps(res))
    return res


def test_schema_version_is_checked(sweep, tmp_path, capsys):
    copy_job(sweep, "3", tmp_path / "sw" / "0")
    copy_job(sweep, "5", tmp_path / "sw" / "1", schema_version=99)
    old = copy_job(sweep, "4", tmp_path / "sw" / "2")
    del old["schema_version"]  # written before the key existed: the layout of version 1
    (tmp_path / "sw" / "2" / "results.json").write_text(json.dumps(old))
    (tmp_path / "sw" / "3").mkdir()
    shutil.copytree(sweep / "3" / ".hydra", tmp_path / "sw" / "3" / ".hydra")
    (tmp_path / "sw" / "3" / "results.json").write_text('{"score": 0.5,')  # cut short
    assert main([str(tmp_path / "sw"), "--wandb", "off"]) == 0
    table = pd.read_csv(tmp_path / "sw" / "report" / "results.csv", dtype={"job": str}).set_index("job")
    assert list(table["status"]) == ["ok", "unsupported", "ok", "unreadable"]
    assert "schema_version 99" in table.loc["1", "note"] and str(tmp_path / "sw" / "1") in table.loc["1", "note"]
    assert "not valid JSON" in table.loc["3", "note"]
    assert "1: unsupported" in capsys.readouterr().err


def test_the_report_reads_the_layout_run_py_writes():
    from mmprune_exp.run import RESULTS_SCHEMA_VERSION

    assert RESULTS_SCHEMA_VERSION in SCHEMA_VERSIONS  # bumped in run.py: teach the report the new layout


def test_pivot_keeps_sweep_order_and_orders_sparsity_by_value(sweep, tmp_path):
    grid = [("wanda", "s70", 0.7), ("wanda", "2of4", 0.5), ("wanda", "s50", 0.5), ("tamp", "s50", 0.5),
            ("tamp", "s70", 0.7), ("tamp", "2of4", 0.5)]  # fmt: skip
    for i, (pruner, label, value) in enumerate(grid):
        copy_job(sweep, "5", tmp_path / str(i), choices={"pruner": pruner, "sparsity": label},
                 target_sparsity=value, recovery=i / 10)  # fmt: skip
    frame, _ = build_report([tmp_path], wandb="off")
    table = pivot(frame)
    assert list(table.index) == ["wanda", "tamp"] and list(table.columns) == ["s50", "2of4", "s70"]
    assert table.loc["tamp", "s70"] == pytest.approx(0.4) and table.loc["wanda", "2of4"] == pytest.approx(0.1)


def test_a_varying_override_becomes_a_factor_with_its_own_plot(sweep, tmp_path):
    for i, n in enumerate((8, 32, 128, None)):  # the last job ran with the config's own nsamples
        res = copy_job(sweep, "5", tmp_path / str(i), recovery=0.5 + i / 10)
        res["overrides"] = [o for o in res["overrides"] if not o.startswith("calibration.")] + (
            [f"calibration.nsamples={n}"] if n else [])  # fmt: skip
        (tmp_path / str(i) / "results.json").write_text(json.dumps(res))
    frame, out = build_report([tmp_path], wandb="off")
    assert frame["calibration.nsamples"].tolist()[:3] == [8, 32, 128]
    table = pivot(frame)
    assert list(table.index) == [(8, "wanda"), (32, "wanda"), (128, "wanda"), ("-", "wanda")]  # no job dropped
    assert table["s50"].tolist() == pytest.approx([0.5, 0.6, 0.7, 0.8])
    assert (out / "recovery_vs_calibration.nsamples.png").exists()
    assert "benchmark.limit" not in (out / "report.md").read_text()  # the same in every job: not a factor


def test_token_pruning_gets_its_table_and_plot(sweep, tmp_path):
    points = [("none", 1.0, 1.0, 1.0), ("fastv", 0.5, 0.5, 0.75), ("fastv", 0.25, 0.25, 0.5)]
    for i, (method, keep, kept, score) in enumerate(points):
        copy_job(sweep, "3", tmp_path / str(i), choices={"token_pruner": method}, keep_ratio=keep, score=score,
                 tokens={"kept_ratio": kept, "flops_ratio": 0.2 + kept * 0.8, "prefill_s": 0.1})  # fmt: skip
    frame, out = build_report([tmp_path], wandb="off")
    tokens = token_table(frame)
    assert list(tokens["token_pruner"]) == ["none", "fastv", "fastv"]
    # methods in sweep order, a method's keep ratios ascending
    assert list(tokens["keep_ratio"]) == [1.0, 0.25, 0.5] and list(tokens["kept_ratio"]) == [1.0, 0.25, 0.5]
    assert tokens["flops_ratio"].tolist() == pytest.approx([1.0, 0.4, 0.6])
    assert "## Token pruning" in (out / "report.md").read_text()
    assert (out / "accuracy_vs_kept_ratio.png").exists()
    assert "tokens.prefill_s" in frame and "tokens.prefill_s" not in tokens  # measured, not a factor


def test_several_run_dirs_need_an_output_dir(sweep, tmp_path, capsys):
    assert main([str(sweep / "2"), str(sweep / "3")]) == USER_ERROR_EXIT
    assert "--out" in capsys.readouterr().err
    assert main([str(sweep / "2"), str(sweep / "3"), "--out", str(tmp_path / "r"), "--wandb", "off"]) == 0
    assert list(pd.read_csv(tmp_path / "r" / "results.csv", dtype={"job": str})["job"]) == ["2", "3"]


def test_a_folder_without_runs_or_without_results_is_a_user_error(sweep, tmp_path, capsys):
    assert main([str(tmp_path)]) == USER_ERROR_EXIT
    assert "no run directories below it" in capsys.readouterr().err
    shutil.copytree(sweep / "7", tmp_path / "sw" / "0")
    assert main([str(tmp_path / "sw")]) == USER_ERROR_EXIT
    assert "no job" in capsys.readouterr().err
    assert "missing" in (tmp_path / "sw" / "report" / "report.md").read_text()  # still says what is there
