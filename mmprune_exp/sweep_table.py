"""A sweep's results as a table: ``python -m mmprune_exp.sweep_table <multirun dir> [--value recovery]``.

Reads every ``results.json`` under the directory (one per job), pivots ``value`` by pruner (rows) and sparsity
label (columns), prints it as Markdown and writes ``<value>_table.csv`` and ``.md`` beside the jobs. Other
group labels that vary across the jobs (benchmark, model) become extra row levels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from mmprune_exp.errors import USER_ERROR_EXIT, DataError


def load_results(root: Path) -> pd.DataFrame:
    """One row per job: its group labels, score, dense score, recovery and achieved sparsity."""
    rows = []
    # Jobs in launch order: Hydra numbers them 0, 1, ..., 10 (a plain sort would put 10 before 2).
    paths = sorted(root.rglob("results.json"),
                   key=lambda p: [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in p.parent.parts])
    for path in paths:
        try:
            res = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err})") from err
        rows.append({**res.get("choices", {}), "job": str(path.parent.relative_to(root)), "score": res.get("score"),
                     "dense_score": res.get("dense_score"), "recovery": res.get("recovery"),
                     "achieved_sparsity": res.get("sparsity")})  # fmt: skip
    if not rows:
        raise DataError(f"{root}: no results.json below it (is it a multirun directory whose jobs finished?)")
    return pd.DataFrame(rows)


def pivot(frame: pd.DataFrame, value: str = "recovery") -> pd.DataFrame:
    varying = [c for c in ("model", "benchmark", "calibration") if c in frame and frame[c].nunique() > 1]
    table = frame.pivot_table(index=[*varying, "pruner"], columns="sparsity", values=value, aggfunc="mean")
    order = list(dict.fromkeys(frame["pruner"]))  # sweep order, not alphabetical
    return table.reindex(order, level="pruner") if varying else table.reindex(order)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmprune_exp.sweep_table", description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="a multirun directory (outputs/multirun/<date>/<time>)")
    parser.add_argument("--value", default="recovery", choices=["recovery", "score", "achieved_sparsity"])
    args = parser.parse_args(argv)
    try:
        table = pivot(load_results(args.root), args.value)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR_EXIT
    markdown = table.round(4).to_markdown()
    print(markdown)
    table.to_csv(args.root / f"{args.value}_table.csv")
    (args.root / f"{args.value}_table.md").write_text(markdown + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
