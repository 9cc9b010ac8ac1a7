"""The sweep table: results.json files of a multirun pivoted by pruner and sparsity."""

from __future__ import annotations

import json

from mmprune_exp.errors import USER_ERROR_EXIT
from mmprune_exp.sweep_table import load_results, main, pivot


def write_job(root, job, pruner, sparsity, recovery):
    (root / job).mkdir(parents=True)
    results = {"choices": {"model": "m", "pruner": pruner, "sparsity": sparsity, "benchmark": "b"},
               "score": recovery, "dense_score": 1.0, "recovery": recovery, "sparsity": 0.5}  # fmt: skip
    (root / job / "results.json").write_text(json.dumps(results))


def test_table_pivots_recovery_in_sweep_order(tmp_path, capsys):
    for job, (pruner, sparsity, rec) in enumerate([("wanda", "s50", 0.9), ("wanda", "s70", 0.5),
                                                    ("tamp", "s50", 0.95), ("tamp", "s70", 0.6)]):  # fmt: skip
        write_job(tmp_path, str(job), pruner, sparsity, rec)
    table = pivot(load_results(tmp_path))
    assert list(table.index) == ["wanda", "tamp"] and list(table.columns) == ["s50", "s70"]
    assert table.loc["tamp", "s70"] == 0.6
    assert main([str(tmp_path)]) == 0
    assert "| tamp" in capsys.readouterr().out and (tmp_path / "recovery_table.csv").exists()


def test_a_directory_without_results_is_a_user_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == USER_ERROR_EXIT
    assert "no results.json" in capsys.readouterr().err
