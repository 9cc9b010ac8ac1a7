"""MATH-Vision (mathllm/MATH-V): loader, prompts, official scoring, per-subject/level tables, score-only CLI.

Data (shared/reference/benchmarks.md §3.1): ``data/test.jsonl`` (3,040 problems) / ``data/testmini.jsonl``
(304) with ``id, question, options, answer, solution, level, subject, image`` and one merged image per
problem under ``images/``; or the same records from a local copy of the HF dataset ``MathLLMs/MathVision``
(``data/<split>-*.parquet`` with the encoded image in ``decoded_image``).

Images: the question keeps its ``<image1>`` tags and the problem's single merged image is placed before
the text (the Qwen2.5-VL adapter's layout). lmms-eval, whose prompt reproduces Qwen's reported numbers,
does the same; the official GPT-4V script puts the image after the text.

Scoring is the official pipeline (:mod:`.answers`); aggregation follows the official
``math_level_subject_acc``: the denominator is the number of scored lines, the keys are ``-all``,
``-level<L>``, ``<subject>``, ``<subject>_level<L>`` and ``-level<L>_<subject>``.

Score-only::

    python -m mmprune_exp.benchmarks.mathv score --data MATH-V/data/test.jsonl --responses outputs/model.jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import numbers
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmprune_exp.benchmarks.base import (
    Benchmark,
    BenchmarkDataError,
    Record,
    check_unique_ids,
    register_benchmark,
    report_user_error,
)
from mmprune_exp.benchmarks.image_files import ImageSource, LazyImageRequest
from mmprune_exp.benchmarks.mathv.answers import EqualityJudge, extract_answer
from mmprune_exp.config.schema import BenchmarkConfig, require
from mmprune_exp.errors import DataError, UserError, where

log = logging.getLogger(__name__)

LEVELS = (1, 2, 3, 4, 5)


MATHV_SPLITS = ("test", "testmini")
MATHV_PROMPTS = ("cot", "direct", "lmms_eval")


@dataclass
class MathVConfig(BenchmarkConfig):
    """MATH-Vision (``benchmark=mathv`` / ``mathv_mini``); ``path`` = a MATH-V checkout or HF dataset copy."""

    name: str = "mathv"
    split: str = "test"  # test (3,040 problems) | testmini (304)
    prompt: str = "cot"  # cot: official boxed-answer prompt | direct: official short answer | lmms_eval
    compare_timeout_s: float = 10.0  # time limit per answer comparison (latex2sympy + eval)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.split in MATHV_SPLITS, "split", f"got {self.split!r}; choose one of {MATHV_SPLITS}")
        require(self.prompt in MATHV_PROMPTS, "prompt", f"got {self.prompt!r}; choose one of {MATHV_PROMPTS}")
        require(self.compare_timeout_s > 0, "compare_timeout_s", f"must be positive, got {self.compare_timeout_s}")


@dataclass
class MathVProblem:
    id: str
    question: str
    options: list[str]
    answer: str
    level: int
    subject: str
    image_ref: str | None  # as written in the data ("images/12.jpg")
    image: ImageSource | None = None  # resolved file (or encoded bytes); None when not found
    origin: str = ""  # where the record is ("data/test.jsonl:4, record 3 (id='4')"), for messages

    @property
    def option_answer(self) -> str:
        """The text of the correct option ("" for free-form problems), as the official scorer looks it up."""
        if not self.options or len(self.answer) != 1:
            return ""
        idx = ord(self.answer) - ord("A")
        # Python indexing, as in the official options[ord(gt) - 65] (which would crash out of range).
        return self.options[idx] if -len(self.options) <= idx < len(self.options) else ""


# -- data ---------------------------------------------------------------------------------------------


_SCALAR = (str, int, float)  # what str() may turn into an id/answer (the official scorer does str(answer))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _problem(raw: Any, at: str) -> MathVProblem:
    """A checked record; ``at`` locates it (``file:line, record N``) in error messages."""
    if not isinstance(raw, dict):
        raise BenchmarkDataError(f"{at}: expected a JSON object (a MATH-V record), got {type(raw).__name__}")
    rid = raw.get("id")
    here = f"{at} (id={str(rid)!r})" if isinstance(rid, _SCALAR) and not isinstance(rid, bool) else at

    def bad(key: str, problem: str) -> BenchmarkDataError:
        return BenchmarkDataError(f"{here}, key {key!r}: {problem}")

    for key in ("id", "answer", "level", "subject"):
        if key not in raw or raw[key] is None:
            raise bad(key, "missing (every MATH-V record needs id, answer, level and subject)")
    for key in ("id", "answer"):
        if not isinstance(raw[key], _SCALAR) or isinstance(raw[key], bool):
            raise bad(key, f"expected a string, got {type(raw[key]).__name__} {raw[key]!r:.80}")
    if str(raw["id"]).strip() == "":
        raise bad("id", "empty")
    level = raw["level"]
    if isinstance(level, str) and level.strip().isdigit():
        level = int(level)
    if not _is_int(level):
        raise bad("level", f"expected an integer (1-5), got {type(level).__name__} {level!r:.80}")
    if not isinstance(raw["subject"], str):
        raise bad("subject", f"expected a string, got {type(raw['subject']).__name__}")
    question = raw.get("question")
    if question is not None and not isinstance(question, str):
        raise bad("question", f"expected a string, got {type(question).__name__}")
    options = raw.get("options")
    if options is None:
        options = []
    elif isinstance(options, (str, dict)) or not hasattr(options, "__iter__"):
        raise bad("options", f"expected a list of strings, got {type(options).__name__} {options!r:.80}")
    else:  # a list (JSON) or an array (parquet)
        options = list(options)
        for k, option in enumerate(options):
            if not isinstance(option, _SCALAR) or isinstance(option, bool):
                raise bad("options", f"option {k} is {type(option).__name__} {option!r:.80}, expected a string")
    image = raw.get("image")
    if image is not None and not isinstance(image, str):
        raise bad("image", f"expected a path string such as 'images/1.jpg', got {type(image).__name__} {image!r:.80}")
    return MathVProblem(
        id=str(raw["id"]),
        question=question or "",
        options=[str(o) for o in options],
        answer=str(raw["answer"]),  # official: gt_answer = str(answer)
        level=int(level),
        subject=raw["subject"],
        image_ref=image,
        origin=here,
    )


def _check_problems(problems: list[tuple[str, MathVProblem]], source: str | Path) -> None:
    """At least one problem, no id twice; ``problems`` pairs each with its location label."""
    if not problems:
        raise BenchmarkDataError(f"{source}: no MATH-V records (the file is empty)")
    check_unique_ids(((label, p.id) for label, p in problems), source, "id")


def _jsonl_values(path: Path, error: type[DataError]):
    """``(line number, record index, decoded value)`` for each non-blank line of a JSON-lines file.

    A line that is not JSON, text that is not UTF-8 and an unreadable file raise ``error`` naming the file
    and the line; what the values must look like is the caller's check.
    """
    try:
        with path.open(encoding="utf-8") as f:
            index = 0
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as err:
                    raise error(f"{where(f'{path}:{n}', index)}: not valid JSON ({err})") from err
                yield n, index, value
                index += 1
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text ({err})") from err
    except DataError:  # also an OSError where the error type is one (BenchmarkDataError): not to be wrapped
        raise
    except OSError as err:
        raise error(f"{path}: cannot be read ({err})") from err


def read_jsonl_problems(path: Path) -> list[MathVProblem]:
    located = [
        (f"{index} (line {n})", _problem(raw, where(f"{path}:{n}", index)))
        for n, index, raw in _jsonl_values(path, BenchmarkDataError)
    ]
    _check_problems(located, path)
    return [p for _, p in located]


def read_parquet_problems(files: list[Path]) -> list[MathVProblem]:
    """Records of the HF dataset ``MathLLMs/MathVision`` (images embedded as ``decoded_image.bytes``)."""
    import pandas as pd

    located = []
    for file in files:
        try:
            frame = pd.read_parquet(file)
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise BenchmarkDataError(f"{file}: not a readable parquet file ({type(err).__name__}: {err})") from err
        for index, raw in enumerate(frame.to_dict("records")):
            problem = _problem(raw, where(file, index))
            encoded = raw.get("decoded_image")
            if isinstance(encoded, dict) and encoded.get("bytes"):
                problem.image = bytes(encoded["bytes"])
            located.append((f"{index} of {file.name}", problem))
    _check_problems(located, files[0] if len(files) == 1 else f"{files[0].parent} ({len(files)} parquet files)")
    return [p for _, p in located]


def _find_image(ref: str | None, roots: list[Path]) -> Path | None:
    if not ref:
        return None
    for root in roots:
        for candidate in (root / ref, root / "images" / Path(ref).name):
            if candidate.is_file():
                return candidate
    return None


def _missing_image(problem: MathVProblem) -> str:
    if problem.image_ref is None:
        return f"{problem.origin}, key 'image': missing (one image per problem is expected)"
    return (f"{problem.origin}, key 'image': {problem.image_ref!r} is not a file under the data file's folder, its "
            "parent or their images/")  # fmt: skip


def load_problems(path: str | Path, split: str = "test") -> list[MathVProblem]:
    """Problems of ``split`` from a MATH-V checkout, a HF dataset copy, or one jsonl/parquet file.

    Images are resolved (not decoded); a problem whose image is not found keeps ``image=None``.
    """
    root = Path(path).expanduser()
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = [p for p in (root / f"{split}.jsonl", root / "data" / f"{split}.jsonl") if p.is_file()][:1]
        if not files:
            files = sorted(root.glob(f"data/{split}-*.parquet")) or sorted(root.glob(f"{split}-*.parquet"))
    else:
        raise BenchmarkDataError(
            f"benchmark.path={str(path)!r} does not exist. Point it at a MATH-V checkout (data/{split}.jsonl + "
            "images/) or a local copy of the HF dataset MathLLMs/MathVision (data/<split>-*.parquet)."
        )
    if not files:
        raise BenchmarkDataError(
            f"benchmark.path={str(path)!r} holds neither {split}.jsonl, data/{split}.jsonl nor "
            f"data/{split}-*.parquet (benchmark.split={split!r})."
        )
    if files[0].suffix == ".parquet":
        return read_parquet_problems(files)
    problems = read_jsonl_problems(files[0])
    roots = list(dict.fromkeys(([root] if root.is_dir() else []) + [files[0].parent, files[0].parent.parent]))
    for problem in problems:
        problem.image = _find_image(problem.image_ref, roots)
    return problems


# -- prompts ------------------------------------------------------------------------------------------

# mathllm/MATH-V models/GPT4V.py (process_example_mergedimg) and models/*.py geninput: options as
# "(A) ...\n" lines, left out when they are just the letters A-E (the letters are drawn in the image).
COT_INSTRUCTION = (
    'Please solve the problem and put your answer in one "\\boxed{}". '
    'If it is a multiple choice question, only one letter is allowed in the "\\boxed{}".\n'
)
DIRECT_SUFFIX = "\nAnswer the question using a single word or phrase."
# lmms-eval tasks/mathvision/utils.py mathvision_doc_to_text (the prompt of PR #660 that reproduces
# Qwen2.5-VL's numbers): no separator after the instruction; choices "A. ..." always listed.
LMMS_INSTRUCTION = 'Please solve the problem step by step and put your answer in one "\\boxed{}".'
LMMS_MC_SUFFIX = "\nAnswer the question with the option's letter from the given choices directly."


def _official_options(options: list[str]) -> str:
    if not options or "".join(options) == "ABCDE":
        return ""
    return "".join(f"({letter}) {option}\n" for letter, option in zip("ABCDE", options))


def render_prompt(problem: MathVProblem, style: str = "cot") -> str:
    """The user text for ``problem`` (``<imageN>`` tags kept) in one of the prompt styles."""
    if style == "cot":
        return COT_INSTRUCTION + f"{problem.question}\n{_official_options(problem.options)}"
    if style == "direct":
        return f"{problem.question}\n{_official_options(problem.options)}{DIRECT_SUFFIX}"
    if style == "lmms_eval":
        text = LMMS_INSTRUCTION + problem.question
        if problem.options:
            choices = "\n".join(f"{letter}. {option}" for letter, option in zip("ABCDE", problem.options))
            text += f"\nChoices: {choices}{LMMS_MC_SUFFIX}"
        return text
    raise ValueError(f"unknown MATH-V prompt style {style!r}; choose cot, direct or lmms_eval")


# -- scoring ------------------------------------------------------------------------------------------


@dataclass
class Judgement:
    model_answer: str
    correct: bool
    timed_out: bool = False


def judge_response(problem: MathVProblem, response: str | None, judge: EqualityJudge) -> Judgement:
    """Official evaluate.py L14-48 for one line; a null response is a miss (the official script crashes)."""
    if response is None:
        return Judgement("", False)
    answer = extract_answer(str(response))
    first = judge.equal(problem.answer, answer)
    if first.equal:
        return Judgement(answer, True)
    second = judge.equal(problem.option_answer, answer)
    return Judgement(answer, second.equal, first.timed_out or second.timed_out)


def _percent(correct: int, total: int) -> float:
    return round(correct / max(total, 1) * 100, 2)


def official_result_dict(entries: Iterable[tuple[str, int, bool]]) -> dict[str, str]:
    """``{key: "c/n=x%"}`` over (subject, level, correct) entries, keys sorted, as math_level_subject_acc."""
    counts: dict[str, list[int]] = {}
    for subject, level, correct in entries:
        for key in ("-all", f"-level{level}", subject, f"{subject}_level{level}", f"-level{level}_{subject}"):
            c = counts.setdefault(key, [0, 0])
            c[0] += bool(correct)
            c[1] += 1
    return {key: f"{c}/{n}={_percent(c, n)}%" for key, (c, n) in sorted(counts.items())}


def slug(name: str) -> str:
    """A metric-key-safe subject name: "metric geometry - area" -> "metric_geometry_area"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def accuracy_table(entries: list[tuple[str, int, bool]]) -> list[dict[str, Any]]:
    """Rows subject x (all, level1..5): accuracy in percent (None where a cell is empty) and counts."""
    cells: dict[tuple[str, Any], list[int]] = defaultdict(lambda: [0, 0])
    for subject, level, correct in entries:
        for key in ((subject, level), (subject, "all"), ("all", level), ("all", "all")):
            cells[key][0] += bool(correct)
            cells[key][1] += 1
    subjects = sorted({s for s, _, _ in entries}) + ["all"]
    table = []
    for subject in subjects:
        row: dict[str, Any] = {"subject": subject, "n": cells[(subject, "all")][1]}
        for col in ("all", *LEVELS):
            c, n = cells.get((subject, col), (0, 0))
            row["all" if col == "all" else f"level{col}"] = _percent(c, n) if n else None
        table.append(row)
    return table


# -- benchmark ----------------------------------------------------------------------------------------


@register_benchmark("mathv", schema=MathVConfig)
class MathV(Benchmark):
    """MATH-Vision accuracy, overall, per subject, per level and per subject x level."""

    cfg: MathVConfig

    def __init__(self, cfg: MathVConfig):
        super().__init__(cfg)
        if not cfg.path:
            raise BenchmarkDataError(
                f"benchmark.path is not set: {self.name} reads MATH-V from disk. Pass benchmark.path=/path/to/MATH-V "
                "(a checkout with data/test.jsonl, data/testmini.jsonl and images/) or a local copy of the HF "
                "dataset MathLLMs/MathVision."
            )
        problems = load_problems(cfg.path, cfg.split)  # checked: not empty, ids unique
        self.problems = {p.id: p for p in problems}
        missing = [p for p in problems if p.image is None]
        self.missing_images = [p.id for p in missing]
        if len(missing) == len(problems):
            raise BenchmarkDataError(
                f"benchmark.path={str(cfg.path)!r}: none of the {len(problems)} MATH-V problems has its image file; "
                f"the first: {_missing_image(missing[0])}"
            )
        if missing:
            log.warning(
                "%s: %d problems have no image under benchmark.path=%s and are skipped: %s (first: %s)",
                self.name, len(missing), cfg.path, ", ".join(self.missing_images[:20]), _missing_image(missing[0]),
            )  # fmt: skip
        self._judge: EqualityJudge | None = None

    @property
    def judge(self) -> EqualityJudge:
        if self._judge is None:
            self._judge = EqualityJudge(self.cfg.compare_timeout_s)
        return self._judge

    def load_records(self, limit: int | None) -> list[Record]:
        records = []
        for problem in self.problems.values():
            if problem.image is None:
                continue
            request = LazyImageRequest(render_prompt(problem, self.cfg.prompt), [problem.image], problem.origin)
            fields = {"subject": problem.subject, "level": problem.level, "options": problem.options}
            records.append(Record(problem.id, request, problem.answer, fields))
            if limit is not None and len(records) >= limit:
                break
        return records

    def score(self, record: Record, response: str) -> dict[str, Any]:
        verdict = judge_response(self.problems[record.id], response, self.judge)
        if verdict.timed_out:
            log.warning("%s: answer comparison for id %s timed out (scored wrong)", self.name, record.id)
        return {
            "parsed": verdict.model_answer or None,
            "model_answer": verdict.model_answer,
            "correct": verdict.correct,
            "timed_out": verdict.timed_out,
            "score": float(verdict.correct),
        }

    def _entries(self, rows: list[dict[str, Any]]) -> list[tuple[str, int, bool]]:
        return [(row["subject"], int(row["level"]), bool(row["correct"])) for row in rows]

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        entries = self._entries(rows)
        by: dict[str, list[bool]] = defaultdict(list)
        for subject, level, correct in entries:
            for key in (f"acc/level/{level}", f"acc/subject/{slug(subject)}",
                        f"acc/subject_level/{slug(subject)}/{level}"):  # fmt: skip
                by[key].append(correct)
        overall = sum(c for _, _, c in entries) / len(entries) if entries else 0.0
        metrics = {"score": overall, "accuracy": overall, "n": float(len(entries))}
        metrics |= {key: sum(v) / len(v) for key, v in sorted(by.items())}
        metrics["unparsed"] = float(sum(row.get("parsed") is None for row in rows))
        metrics["timeouts"] = float(sum(bool(row.get("timed_out")) for row in rows))
        metrics["missing_images"] = float(len(self.missing_images))
        return metrics

    def write_tables(self, rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
        """``<name>_result.json`` in the official format and ``<name>_table.csv`` (subject x level, %)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        entries = self._entries(rows)
        result_path = out_dir / f"{self.name}_result.json"
        result_path.write_text(json.dumps(official_result_dict(entries), indent=4, ensure_ascii=False))
        table_path = out_dir / f"{self.name}_table.csv"
        write_csv(table_path, accuracy_table(entries))
        return [result_path, table_path]


@register_benchmark("mathv_mini")
class MathVMini(MathV):
    """The 304-problem testmini split (``benchmark=mathv_mini``)."""


def write_csv(path: Path, table: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]) if table else ["subject"])
        writer.writeheader()
        writer.writerows(table)


# -- score-only command -------------------------------------------------------------------------------


@dataclass
class ScoreReport:
    result: dict[str, str]
    lines: list[dict[str, Any]]  # scored lines: the input line plus model_answer and correct
    unknown_ids: list[str]
    null_responses: list[str]
    timeouts: list[str]


def score_responses(
    problems: dict[str, MathVProblem], lines: list[dict[str, Any]], timeout_s: float | None = 10.0
) -> ScoreReport:
    """Score official-format output lines (``{"id", "response", ...}``) against the problems.

    Like the official script, the denominator is the lines present (duplicates count twice, missing ids
    are not counted). Unlike it, an unknown id is skipped and a null response is a miss, both reported.
    """
    scored, entries, unknown, nulls, timeouts = [], [], [], [], []
    with EqualityJudge(timeout_s) as judge:
        for line in lines:
            pid = str(line.get("id"))
            problem = problems.get(pid)
            if problem is None:
                unknown.append(pid)
                continue
            response = line.get("response")
            if response is None:
                nulls.append(pid)
            verdict = judge_response(problem, response, judge)
            if verdict.timed_out:
                timeouts.append(pid)
            out = line | {"model_answer": verdict.model_answer, "correct": verdict.correct}
            if verdict.timed_out:
                out["timed_out"] = True
            scored.append(out)
            entries.append((problem.subject, problem.level, verdict.correct))
    return ScoreReport(official_result_dict(entries), scored, unknown, nulls, timeouts)


def read_response_lines(path: Path) -> list[dict[str, Any]]:
    """The lines of an output file, each checked: a JSON object with an ``id`` and a ``response`` (string or null)."""
    if not path.is_file():
        raise DataError(f"--responses {path}: no such file")
    lines = []
    for n, index, line in _jsonl_values(path, DataError):
        if not isinstance(line, dict):
            raise DataError(f'{where(f"{path}:{n}", index)}: expected a JSON object {{"id": ..., "response": ...}}, '
                            f"got {type(line).__name__}")  # fmt: skip
        pid = line.get("id")
        if pid is None or isinstance(pid, bool) or not isinstance(pid, _SCALAR):
            raise DataError(f"{where(f'{path}:{n}', index, key='id')}: "
                            + ("missing" if pid is None else f"expected a string, got {type(pid).__name__}"))
        here = where(f"{path}:{n}", index, str(pid), "response")
        if "response" not in line:
            raise DataError(f"{here}: missing (use null for no answer)")
        if line["response"] is not None and not isinstance(line["response"], str):
            raise DataError(f"{here}: expected a string or null, got {type(line['response']).__name__}")
        lines.append(line)
    if not lines:
        raise DataError(f"--responses {path}: no lines to score (the file is empty)")
    return lines


def _score_command(args: argparse.Namespace) -> int:
    try:
        problems = {p.id: p for p in load_problems(args.data, args.split)}
    except BenchmarkDataError as err:
        raise BenchmarkDataError(str(err).replace("benchmark.path", "--data")) from err
    responses = Path(args.responses)
    report = score_responses(problems, read_response_lines(responses), timeout_s=args.timeout)
    out_dir = Path(args.out_dir) if args.out_dir else responses.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = responses.name[: -len(".jsonl")] if responses.name.endswith(".jsonl") else responses.stem
    result_path = out_dir / f"{stem}_result.json"
    result_path.write_text(json.dumps(report.result, indent=4, ensure_ascii=False), encoding="utf-8")
    scored_path = out_dir / f"{stem}_scored.jsonl"
    with scored_path.open("w", encoding="utf-8") as f:
        for line in report.lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    for label, ids in (("unknown id (skipped)", report.unknown_ids), ("null response (scored wrong)",
                       report.null_responses), ("comparison timed out (scored wrong)", report.timeouts)):  # fmt: skip
        if ids:
            counts = Counter(ids)
            shown = ", ".join(f"{i}" + (f" (x{counts[i]})" if counts[i] > 1 else "") for i in list(counts)[:30])
            print(f"warning: {len(ids)} line(s) with {label}: {shown}", file=sys.stderr)
    print(f"{responses.name} :\t {report.result.get('-all', '0/0=0')}")
    print(f"wrote {result_path} and {scored_path}")
    return 0 if report.lines else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmprune_exp.benchmarks.mathv", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="score output lines made elsewhere with the official rules")
    score.add_argument("--data", required=True, help="test.jsonl / testmini.jsonl (or a MATH-V dir / HF copy)")
    score.add_argument("--split", default="test", choices=["test", "testmini"], help="when --data is a directory")
    score.add_argument("--responses", required=True, help='jsonl with one {"id", "response"} per line')
    score.add_argument("--out-dir", default=None, help="where to write the results (default: beside --responses)")
    score.add_argument("--timeout", type=float, default=10.0, help="seconds per answer comparison (default 10)")
    args = parser.parse_args(argv)
    try:
        return _score_command(args)
    except UserError as err:  # bad input: one line, no traceback; anything else is a bug and keeps its traceback
        return report_user_error(err)

