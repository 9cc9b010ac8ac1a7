"""A sweep's report: ``python -m mmprune_exp.report <sweep dir | run dirs...> [--out DIR] [--wandb auto|on|off]``.

Reads each job's ``results.json`` and nothing else of the run (plus Hydra's ``.hydra/overrides.yaml`` and
``run.log`` for a job that has no results), so it works on run directories copied off a cluster and never
imports the code that produced them. A job directory is one that holds ``.hydra/`` or ``results.json``; one
without results is listed as failed (``run.log`` has an error) or missing (still running, killed), not an error.

Writes into the output directory (default ``<sweep dir>/report``; ``--out`` when several paths are given):

- ``results.csv``: one row per job, its status, group labels (``pruner``, ``sparsity``, ``benchmark``, ...),
  token pruning's ``keep_ratio``, the overrides that vary across the jobs (``calibration.nsamples``, ...),
  score, dense score, recovery, achieved sparsity, the token block's figures (``kept_ratio``, ``flops_ratio``)
  when the runs have one, each metric, stage times, peak memory and the W&B run id;
- ``report.md``: pruner x sparsity x benchmark (and every other factor that varies) with score, dense score and
  recovery; the recovery and score pivots (pruner rows, sparsity columns); a token-pruning table when token
  pruning varies; the jobs without results;
- ``score_vs_sparsity.png``, ``recovery_vs_sparsity.png``: one line per pruner (N:M points as markers), one
  panel per benchmark; ``recovery_vs_<override>.png`` for each numeric override that varies;
  ``accuracy_vs_kept_ratio.png`` when token pruning varies;

prints the recovery pivot, and (``--wandb``; ``auto``: when the jobs logged to W&B) logs the table and the
plots as a ``job_type=report`` W&B run in the sweep's group, offline without an API key like the jobs.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from mmprune_exp.errors import USER_ERROR_EXIT, DataError

log = logging.getLogger(__name__)

#: results.json layouts this report reads (``mmprune_exp.run.RESULTS_SCHEMA_VERSION``; a test keeps them in step).
#: A file without ``schema_version`` was written before the key existed, with the layout of version 1.
SCHEMA_VERSIONS = (1,)

#: Group labels that say nothing about the result (where the run logged to).
_IGNORED_CHOICES = ("logger",)
#: Overrides that are not a factor of the result: where things are written and logged, the experiment and debug
#: files (their groups and values are in the results), and sparsity's values (its label follows them).
_IGNORED_OVERRIDES = re.compile(r"^(hydra|paths|logger|experiment|debug|sparsity)(\.|$)")
#: Factors read first when tables are sorted and indexed: outer to inner, pruner and sparsity innermost.
_OUTER = ("benchmark", "model", "calibration")
_INNER = ("pruner", "sparsity")
_NM = re.compile(r"^\d+of\d+$")  # N:M sparsity labels (mmprune_exp.config.schema.sparsity_label)
_VALUES = ("score", "dense_score", "recovery", "achieved_sparsity")
_TOKEN_VALUES = ("kept_ratio", "flops_ratio")


# -- reading the jobs ---------------------------------------------------------------------------------------


def _launch_order(path: Path) -> list[tuple[int, int, str]]:
    # Hydra numbers a sweep's jobs 0, 1, ..., 10: a plain sort would put 10 before 2.
    return [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in path.parts]


def _is_job(path: Path) -> bool:
    return (path / "results.json").is_file() or (path / ".hydra").is_dir()


def find_jobs(paths: list[Path], exclude: Path | None = None) -> list[Path]:
    """The run directories named by ``paths``: each a run directory itself or a folder (a sweep) holding some."""
    jobs: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise DataError(f"{path}: no such directory (pass a sweep directory or run directories)")
        if _is_job(path):
            jobs.append(path)
            continue
        found = {p.parent for p in path.rglob("results.json")} | {p.parent for p in path.rglob(".hydra") if p.is_dir()}
        if exclude is not None:
            found = {p for p in found if exclude.resolve() not in (p.resolve(), *p.resolve().parents)}
        # A results.json inside a job (a copied pruned_model/, a W&B media folder) is not another job.
        found = {p for p in found if not any(q in found for q in p.parents)}
        if not found:
            raise DataError(f"{path}: no run directories below it (a run directory holds .hydra/ or results.json)")
        jobs += sorted(found, key=_launch_order)
    return list(dict.fromkeys(jobs))


def _value(text: str) -> Any:
    """An override's value as the sweep wrote it: ``16`` -> 16, ``0.5`` -> 0.5, anything else stays text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _overrides(items: list[str], skip: set[str]) -> dict[str, Any]:
    """``["pruner=wanda", "calibration.nsamples=16"]`` -> ``{"calibration.nsamples": 16}``: the values that are
    not a group's option (``skip`` names those, whose labels the results hold) nor an ignored key."""
    out = {}
    for item in items:
        key, sep, value = item.lstrip("+~").partition("=")
        if sep and key not in skip and not _IGNORED_OVERRIDES.match(key):
            out[key] = _value(value)
    return out


def _flat(tree: dict[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """Scalar leaves of a nested dict: ``{"a": {"b": 1}}`` -> ``{"<prefix>a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in (tree or {}).items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        elif value is None or isinstance(value, (int, float, str, bool)):
            out[f"{prefix}{key}"] = value
    return out


def _last_error(run_log: Path) -> str | None:
    if not run_log.is_file():
        return None
    errors = [line for line in run_log.read_text(errors="replace").splitlines() if "[ERROR]" in line]
    return errors[-1].split("[ERROR] - ", 1)[-1].strip() if errors else None


def _without_results(job: Path, name: str, status: str, note: str) -> dict[str, Any]:
    """A job with no usable results: what it was asked to run (its Hydra overrides) and why there is nothing."""
    row: dict[str, Any] = {"job": name, "status": status, "note": note}
    overrides_file = job / ".hydra" / "overrides.yaml"
    if overrides_file.is_file():
        import yaml

        overrides = yaml.safe_load(overrides_file.read_text()) or []
        row["overrides"] = " ".join(str(o) for o in overrides)
        for item in overrides:
            key, sep, value = str(item).lstrip("+~").partition("=")
            if sep and "." not in key and "/" not in key and not _IGNORED_OVERRIDES.match(key):  # a group's option
                row[key] = value
    return row


def read_job(job: Path, name: str) -> dict[str, Any]:
    """One row of the report: a job's results.json flattened, or a row saying why it has none."""
    file = job / "results.json"
    if not file.is_file():
        error = _last_error(job / "run.log")
        if error is not None:
            return _without_results(job, name, "failed", error)
        return _without_results(job, name, "missing", "no results.json (still running, killed, or not started)")
    try:
        res = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        return _without_results(job, name, "unreadable", f"{file}: not valid JSON ({err})")
    version = res.get("schema_version", 1)
    if version not in SCHEMA_VERSIONS:
        return _without_results(job, name, "unsupported",
                                f"{file}: schema_version {version}; this report reads {list(SCHEMA_VERSIONS)}: "
                                "update mmprune_exp")  # fmt: skip
    choices = {k: v for k, v in res.get("choices", {}).items() if k not in _IGNORED_CHOICES}
    # token pruning's knob has its own key (the figures it gave are in the tokens block); absent before it existed
    knobs = {"keep_ratio": res["keep_ratio"]} if "keep_ratio" in res else {}
    skip = set(res.get("choices", {})) | ({"token_pruner.keep_ratio"} if knobs else set())
    time_s = res.get("time_s") or {}
    row = {
        "job": name,
        "status": "ok",
        **choices,
        **knobs,
        **_overrides(res.get("overrides", []), skip),
        "seed": res.get("seed"),
        "target_sparsity": res.get("target_sparsity"),
        "score": res.get("score"),
        "dense_score": res.get("dense_score"),
        "recovery": res.get("recovery"),
        "achieved_sparsity": res.get("sparsity"),
        # token pruning, in runs that have it: the headline ratios by name, anything else under tokens.
        **{k: v for k, v in _flat(res.get("tokens")).items() if k in _TOKEN_VALUES},
        **{f"tokens.{k}": v for k, v in _flat(res.get("tokens")).items() if k not in _TOKEN_VALUES},
        "n_samples": res.get("n_samples"),
        **_flat(res.get("metrics"), "metric."),
        **{f"time.{k}_s": v for k, v in time_s.items()},
        "time.total_s": sum(time_s.values()) if time_s else None,
        **_flat(res.get("mem"), "mem."),
        "eval_samples_per_s": res.get("eval_samples_per_s"),
        "dense_from_cache": res.get("dense_from_cache"),
        "wandb_run_id": res.get("wandb_run_id"),
        "overrides": " ".join(res.get("overrides", [])),
    }
    return row


def load_jobs(jobs: list[Path]) -> pd.DataFrame:
    """One row per job, in the order given; ``job`` names the folder below the jobs' common parent."""
    import os

    base = Path(os.path.commonpath([job.resolve().parent for job in jobs]))
    return pd.DataFrame([read_job(job, str(job.resolve().relative_to(base))) for job in jobs])


# -- tables -------------------------------------------------------------------------------------------------


def factors(frame: pd.DataFrame) -> list[str]:
    """The columns that say what a job ran (labels, varied overrides, seed), outer to inner."""
    done = {"job", "status", "note", "overrides", "target_sparsity", "n_samples", "eval_samples_per_s",
            "dense_from_cache", "wandb_run_id", *_VALUES, *_TOKEN_VALUES}  # fmt: skip
    measured = ("metric.", "time.", "mem.", "tokens.")
    labels = [c for c in frame.columns if c not in done and not c.startswith(measured)]
    inner = [c for c in _INNER if c in labels]
    outer = [c for c in _OUTER if c in labels]
    return outer + [c for c in labels if c not in outer and c not in inner] + inner


def varying(frame: pd.DataFrame) -> list[str]:
    """Factors with more than one value among the jobs that have results."""
    ok = frame[frame["status"] == "ok"]
    return [c for c in factors(frame) if c in ok and ok[c].astype(str).nunique() > 1]


def _jobs_with_results(frame: pd.DataFrame) -> pd.DataFrame:
    """The jobs with results, a factor a job does not have (an override only some jobs were given) shown as "-".

    Without it pandas would drop those jobs from a pivot (a NaN index value), and a table would show "nan".
    """
    ok = frame[frame["status"] == "ok"].copy()
    for column in factors(frame):
        if column in ok and ok[column].isna().any():
            ok[column] = ok[column].astype(object).where(ok[column].notna(), "-")
    return ok


def _ordered(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Rows sorted by ``keys``: values in sweep order, sparsity by its target value (s10 < s50 < 2of4 < s70)."""
    frame = frame.copy()
    sort_cols = []
    for key in keys:
        if key == "sparsity" and "target_sparsity" in frame:
            rank = frame.groupby("sparsity", sort=False)["target_sparsity"].first()
            rank = {label: (value, _NM.match(str(label)) is not None) for label, value in rank.items()}
            order = sorted(rank, key=lambda label: rank[label])
        else:
            values = frame[key].dropna().unique().tolist()
            order = sorted(values) if all(isinstance(v, (int, float)) for v in values) else values
        frame[f"_{key}"] = frame[key].map({v: i for i, v in enumerate(order)})
        sort_cols.append(f"_{key}")
    if sort_cols:
        frame = frame.sort_values(sort_cols, kind="stable")
    return frame.drop(columns=sort_cols)


def results_table(frame: pd.DataFrame) -> pd.DataFrame:
    """pruner x sparsity x benchmark (and every other factor that varies) -> score, dense score, recovery."""
    ok = _jobs_with_results(frame)
    keys = list(dict.fromkeys([c for c in factors(frame) if c in varying(frame) or c in ("benchmark", *_INNER)]))
    keys = [k for k in keys if k in ok]
    values = [c for c in _VALUES if c in ok and ok[c].notna().any()]
    if _token_pruned(frame):
        values += [c for c in _TOKEN_VALUES if c in ok and ok[c].notna().any()]
    return _ordered(ok, keys)[[*keys, *values, "job"]].reset_index(drop=True)


def pivot(frame: pd.DataFrame, value: str = "recovery") -> pd.DataFrame:
    """``value`` with one row per pruner (and per other varying factor) and one column per sparsity label.

    Every varying factor is a row level, so a cell averages only jobs that ran the same configuration twice.
    """
    ok = _jobs_with_results(frame)
    rows = [c for c in varying(frame) if c != "sparsity" and c != "pruner"] + ["pruner"]
    ordered = _ordered(ok, [*rows, "sparsity"])
    table = ordered.pivot_table(index=rows, columns="sparsity", values=value, aggfunc="mean", sort=False)
    return table[list(dict.fromkeys(ordered["sparsity"]))]


def _token_pruned(frame: pd.DataFrame) -> bool:
    """Whether any job pruned visual tokens (every run reports its token figures, token_pruner=none too)."""
    ok = frame[frame["status"] == "ok"]
    return token_pruning_varies(frame) or ("token_pruner" in ok and (ok["token_pruner"] != "none").any())


def token_pruning_varies(frame: pd.DataFrame) -> bool:
    """Whether the jobs differ in their token pruning: the method, its keep ratio, or the share of tokens kept."""
    ok = frame[frame["status"] == "ok"]
    kept = ok["kept_ratio"].dropna().round(6).nunique() if "kept_ratio" in ok else 0
    return kept > 1 or any(c in varying(frame) for c in ("token_pruner", "keep_ratio"))


def token_table(frame: pd.DataFrame) -> pd.DataFrame | None:
    """Token pruning: token_pruner x keep ratio (x every other varying factor) -> kept ratio, FLOPs, score."""
    if not token_pruning_varies(frame):
        return None
    ok = _jobs_with_results(frame)
    keys = [c for c in varying(frame) if c in ok]
    for key in ("keep_ratio", "token_pruner"):
        if key in ok and key not in keys:
            keys.insert(0, key)
    values = [c for c in (*_TOKEN_VALUES, "score", "recovery") if c in ok]
    return _ordered(ok, keys)[[*keys, *values]].reset_index(drop=True)


def _markdown(table: pd.DataFrame) -> str:
    # "-" for a cell no job filled (a pruner not run at that sparsity); tabulate leaves NaN as "nan"
    return table.astype(object).where(table.notna(), None).to_markdown(index=False, floatfmt=".4f", missingval="-")


def markdown_report(frame: pd.DataFrame, sources: list[Path]) -> str:
    ok = frame[frame["status"] == "ok"]
    lost = frame[frame["status"] != "ok"]
    lines = [f"# Sweep report: {', '.join(str(s) for s in sources)}", "",
             f"{len(frame)} jobs: {len(ok)} with results, {len(lost)} without."]  # fmt: skip
    if not ok.empty:
        vary = varying(frame)
        lines += ["", f"Varies: {', '.join(vary) if vary else 'nothing (one configuration)'}.", ""]
        lines += ["## Results", "", _markdown(results_table(frame)), ""]
        for value, title in (("recovery", "Recovery (pruned / dense score)"), ("score", "Score")):
            if ok[value].notna().any():
                lines += [f"## {title}", "", _markdown(pivot(frame, value).reset_index()), ""]
        dense = ok.dropna(subset=["dense_score"]).drop_duplicates(["model", "benchmark", "dense_score"])
        if not dense.empty:
            lines += ["Dense score: " + "; ".join(f"{r['model']} on {r['benchmark']}: {r['dense_score']:.4f}"
                                                  for _, r in dense.iterrows()), ""]  # fmt: skip
        tokens = token_table(frame)
        if tokens is not None:
            lines += ["## Token pruning", "", _markdown(tokens), ""]
    if not lost.empty:
        cols = [c for c in ("job", "status", "overrides", "note") if c in lost]
        lines += ["## Jobs without results", "", _markdown(lost[cols].fillna("")), ""]
    return "\n".join(lines)


# -- plots --------------------------------------------------------------------------------------------------


def _label(key: tuple, names: list[str]) -> str:
    return " ".join(str(v) if n in ("pruner", "token_pruner") else f"{n}={v}" for n, v in zip(names, key))


def plot(frame: pd.DataFrame, x: str, y: str, path: Path, xlabel: str, ylabel: str, series: list[str],
         reference: str | None = None, drop_dense: bool = True) -> Path | None:  # fmt: skip
    """``y`` against ``x``, one line per ``series`` value, one panel per benchmark (and model, if it varies).

    Points of N:M sparsity are drawn as markers beside the line of the same series (their x is n/m, the same
    as an unstructured point's, but they are another method). ``reference``: ``dense`` draws each panel's
    dense score, ``one`` full recovery. ``drop_dense`` leaves out ``pruner=none`` jobs (the reference line).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a cluster node
    import matplotlib.pyplot as plt

    data = frame[(frame["status"] == "ok") & frame[x].notna() & frame[y].notna()]
    if drop_dense and "pruner" in data:
        data = data[data["pruner"] != "none"]
    if data.empty:
        return None
    panels_by = [c for c in ("model", "benchmark") if c in data and (c == "benchmark" or data[c].nunique() > 1)]
    series = [s for s in series if s in data and s not in panels_by] or ["pruner"]
    panels = list(data.groupby(panels_by, sort=False)) if panels_by else [((), data)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (panel_key, part) in zip(axes[0], panels):
        part = _ordered(part, series)
        for i, (key, line) in enumerate(part.groupby(series, sort=False)):
            key = key if isinstance(key, tuple) else (key,)
            color = f"C{i % 10}"
            nm = line["sparsity"].astype(str).str.match(_NM) if "sparsity" in line else pd.Series(False, line.index)
            curve = line[~nm].groupby(x)[y].mean().sort_index()
            ax.plot(curve.index, curve.values, "o-", color=color, label=_label(key, series))
            for label, point in line[nm].groupby("sparsity", sort=False):
                ax.plot(point[x].mean(), point[y].mean(), "D", color=color, markerfacecolor="none",
                        label=f"{_label(key, series)} {label}")  # fmt: skip
        if reference == "dense" and "dense_score" in part and part["dense_score"].notna().any():
            ax.axhline(part["dense_score"].mean(), color="gray", ls="--", lw=1, label="dense")
        elif reference == "one":
            ax.axhline(1.0, color="gray", ls="--", lw=1)
        panel_key = panel_key if isinstance(panel_key, tuple) else (panel_key,)
        ax.set_title(" / ".join(str(k) for k in panel_key))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_plots(frame: pd.DataFrame, out: Path) -> list[Path]:
    vary = varying(frame)
    others = [c for c in vary if c not in ("sparsity", "pruner", "model", "benchmark")]
    made = [
        plot(frame, "target_sparsity", "score", out / "score_vs_sparsity.png", "target sparsity", "score",
             ["pruner", *others], reference="dense"),
        plot(frame, "target_sparsity", "recovery", out / "recovery_vs_sparsity.png", "target sparsity",
             "recovery (pruned / dense)", ["pruner", *others], reference="one"),
    ]  # fmt: skip
    ok = frame[frame["status"] == "ok"]
    for key in others:  # a numeric override that varies (calibration.nsamples, ...): recovery against it
        if key != "seed" and "keep" not in key and pd.api.types.is_numeric_dtype(ok[key]):
            rest = [c for c in vary if c not in (key, "model", "benchmark", "seed")]
            made.append(plot(frame, key, "recovery", out / f"recovery_vs_{key}.png", key, "recovery", rest,
                             reference="one"))  # fmt: skip
    if token_pruning_varies(frame) and "kept_ratio" in ok:
        # the keep-ratio knob is what moves along x; every other varying factor is its own line
        rest = [c for c in vary if c not in ("model", "benchmark", "seed", "token_pruner") and "keep" not in c]
        made.append(plot(frame, "kept_ratio", "score", out / "accuracy_vs_kept_ratio.png", "kept visual-token ratio",
                         "score", ["token_pruner", *rest], reference="dense", drop_dense=False))  # fmt: skip
    return [p for p in made if p is not None]


# -- W&B ----------------------------------------------------------------------------------------------------


def log_to_wandb(frame: pd.DataFrame, plots: list[Path], out: Path, infos: list[dict[str, Any]],
                 sources: list[Path]) -> str | None:  # fmt: skip
    """The sweep's table and plots as one W&B run (``job_type=report``) in the jobs' project and group.

    Each report run starts afresh (the report folder's earlier W&B files are replaced), keeping its run id so
    a report rerun after more jobs finished updates the same W&B run instead of adding one.
    """
    from mmprune_exp.config.schema import LoggerConfig
    from mmprune_exp.tracking import WandbTracker

    groups = list(dict.fromkeys(i.get("group") for i in infos if i.get("group")))
    projects = list(dict.fromkeys(i.get("project") for i in infos if i.get("project")))
    if len(groups) > 1:
        log.warning("the jobs belong to %d W&B groups (%s); the report run joins %s", len(groups),
                    ", ".join(groups), groups[0])  # fmt: skip
    group = groups[0] if groups else out.parent.name
    entity = next((i.get("entity") for i in infos if i.get("entity")), None)
    cfg = LoggerConfig(name="wandb", project=projects[0] if projects else "mmprune-exp", entity=entity, group=group,
                       job_type="report", run_name=f"{group}-report", tags=["report"])  # fmt: skip
    shutil.rmtree(out / "wandb", ignore_errors=True)
    config = {"sources": [str(s) for s in sources], "jobs": len(frame), "jobs_ok": int((frame["status"] == "ok").sum()),
              "varies": varying(frame)}  # fmt: skip
    tracker = WandbTracker(cfg, config, out)
    if tracker.run is None:
        return None
    rows = json.loads(frame.to_json(orient="records"))  # plain Python values, NaN -> None
    tracker.log_table("sweep/results", rows)
    for png in plots:
        tracker.log_image(f"sweep/{png.stem}", png)
    ok = frame[frame["status"] == "ok"]
    summary = {"jobs": len(frame), "jobs_ok": len(ok)}
    if not ok.empty and ok["recovery"].notna().any():
        best = ok.loc[ok["recovery"].idxmax()]
        summary |= {"best/recovery": float(best["recovery"]), "best/job": str(best["job"])}
    tracker.summary(summary)
    run_id = tracker.run_id
    tracker.finish(0)
    log.info("W&B report run %s in group %s (project %s)", run_id, group, cfg.project)
    return run_id


# -- the command --------------------------------------------------------------------------------------------


def build_report(paths: list[Path], out: Path | None = None, wandb: str = "auto") -> tuple[pd.DataFrame, Path]:
    """Write the report of ``paths`` (a sweep directory, or run directories) into ``out``; returns the jobs.

    The CSV and Markdown are written even when no job has results (they list why); plots and W&B need results.
    """
    if out is None:
        if len(paths) > 1:
            raise DataError("several directories given: pass --out DIR for the report")
        out = paths[0] / "report"
    jobs = find_jobs(paths, exclude=out)
    frame = load_jobs(jobs)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "results.csv", index=False)
    (out / "report.md").write_text(markdown_report(frame, paths) + "\n")
    if not (frame["status"] == "ok").any():
        return frame, out
    plots = make_plots(frame, out)
    infos = [json.loads((job / "wandb_run.json").read_text()) for job in jobs if (job / "wandb_run.json").is_file()]
    if wandb == "on" or (wandb == "auto" and infos):
        log_to_wandb(frame, plots, out, infos, paths)
    return frame, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmprune_exp.report", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="a sweep directory (outputs/multirun/<date>/<time>) "
                        "or run directories")  # fmt: skip
    parser.add_argument("--out", type=Path, help="output directory (default: <sweep dir>/report)")
    parser.add_argument("--wandb", choices=["auto", "on", "off"], default="auto",
                        help="log the table and plots as a W&B run in the sweep's group (auto: if the jobs did)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        frame, out = build_report(args.paths, args.out, args.wandb)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR_EXIT
    for _, row in frame[frame["status"] != "ok"].iterrows():
        print(f"warning: {row['job']}: {row['status']}: {row['note']}", file=sys.stderr)
    print(f"report written to {out}", file=sys.stderr)
    if not (frame["status"] == "ok").any():
        print(f"error: no job in {', '.join(map(str, args.paths))} has results (see {out / 'report.md'})",
              file=sys.stderr)  # fmt: skip
        return USER_ERROR_EXIT
    if frame["recovery"].notna().any():
        print(_markdown(pivot(frame, "recovery").reset_index()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
