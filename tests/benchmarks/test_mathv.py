"""MATH-V: official extraction/equality rule by rule, aggregation format, loaders, prompts, the score-only
command, and a benchmark run through the evaluation runner.

``tests/fixtures/mathv/**/expected/`` holds what the official ``evaluate.py`` (mathllm/MATH-V a1f5cc3,
latex2sympy2 1.9.1) wrote for the fixture outputs (``tests/fixtures/record_official.py``).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mmprune_exp.benchmarks import build_benchmark
from mmprune_exp.benchmarks.base import BenchmarkDataError
from mmprune_exp.benchmarks.mathv import (
    MathVConfig,
    MathVProblem,
    accuracy_table,
    judge_response,
    load_problems,
    main,
    official_result_dict,
    render_prompt,
    score_responses,
    slug,
)
from mmprune_exp.benchmarks.mathv.answers import (
    EqualityJudge,
    eval_tuple,
    extract_answer,
    find_math_answer,
    fix_a_slash_b,
    fix_fracs,
    fix_sqrt,
    is_equal,
    is_number,
    strip_latex,
)
from mmprune_exp.evaluation import evaluate
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "mathv"
CASES = FIXTURES / "cases"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


OFFICIAL_CASES = _jsonl(CASES / "expected" / "cases.jsonl")
CASE_PROBLEMS = {p.id: p for p in load_problems(CASES / "data" / "test.jsonl")}


@pytest.fixture(scope="module")
def in_process_judge():
    return EqualityJudge(timeout_s=None)


# -- every recorded official case ------------------------------------------------------------------


@pytest.mark.parametrize("case", OFFICIAL_CASES, ids=[f"case{c['id']}" for c in OFFICIAL_CASES])
def test_extraction_and_verdict_match_the_official_scorer(case, in_process_judge):
    verdict = judge_response(CASE_PROBLEMS[case["id"]], case["response"], in_process_judge)
    assert verdict.model_answer == case["model_answer"]
    assert verdict.correct == case["correct"]


# -- extraction rules (evaluate.py L21-45) ----------------------------------------------------------


@pytest.mark.parametrize(
    "response,expected",
    [
        ("So we pick C.", "c"),  # " C." at the end
        ("It must be (D).", "d"),  # " (D)." at the end
        ("B\nbecause", "b"),  # "B\n" at the start
        ("(E)\nothers fail", "e"),
        ("(A) A\nsymmetric", "a"),
        ("C.", "c"),  # no leading space: not the letter rule, but "." is stripped at the end anyway
        ("The total is 42.", "42"),  # text after the last "is " is a number
        ("the answer is 3. Wait, the answer is 4.", "4"),
        ("the final answer is 7. More.", "7"),  # flag: up to ". "
        ("The answer is 12\nmore", "12"),  # capitalised flag, up to the newline
        ("the answer should be 5, surely", "5,surely"),
        ("The answer is: 5", "5"),  # ":" stripped on the left
        ("\\boxed{1} and then \\boxed{2}", "2"),  # several boxes: the last
        ("\\boxed{C}, but the answer is D", "c"),  # a box disables the answer phrases
        ("\\boxed{5} and {x}", "5"),  # "}" before "{" closes the box
        ("\\boxed{(B)}", "b"),
        ("\\boxed{\\text{B}}", "b"),
        ("", ""),
    ],
)
def test_extraction_rules(response, expected):
    assert extract_answer(response) == expected


def test_is_number_is_pythons_float():
    assert is_number("12") and is_number(" 3.5 ") and is_number("1e3") and is_number("nan")
    assert not is_number("") and not is_number("12 cm") and not is_number("1/2")


# -- normalisation (find_math_answer, _strip_string) ------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # greedy: nested braces kept
        ("x = 5", "5"),  # after the last "="
        ("\\approx 3.14", "3.14"),
        ("12 \\, 000", "12000"),  # spaces and "\," removed
        ("∞", "\\infty"),
        ("+\\infty", "\\infty"),
        ("60^{\\circ}", "60"),
        ("60^\\circ", "60"),
        ("\\text{B}", "{b}"),  # "\text" dropped, braces stay ("{b}" becomes "b" only in extract_answer)
        ("\\left(1,2\\right)", "(1,2)"),
        ("8 m^3", "8"),
        ("5 units", "5"),
        ("12 km", "12"),
        ("\\begin{bmatrix}1\\end{bmatrix}", "\\begin{pmatrix}1\\end{pmatrix}"),
        ("ABC", "abc"),  # lower-cased
        ("{}3", "3"),
    ],
)
def test_find_math_answer_steps(text, expected):
    assert find_math_answer(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\tfrac{1}{2}", "\\frac{1}{2}"),
        ("\\$5", "5"),
        ("$5$", "5"),
        ("50\\%", "50"),
        ("12\\text{ cm}", "12"),  # "\text{ " cuts the units off
        (".5", "\\frac{1}{2}"),  # leading "." -> "0.5" -> \frac{1}{2}
        ("0.5", "\\frac{1}{2}"),
        ("a=3", "3"),  # a single "=" splits
        ("a=b=3", "a=b=3"),  # two do not
        ("2\\sqrt3", "2\\sqrt{3}"),
        ("\\sqrt2/2", "\\sqrt{2}/2"),
        ("\\frac12", "\\frac12"),  # \frac repair only runs when "sqrt" is present
        ("\\frac{\\sqrt2}2", "\\frac{\\sqrt{2}}2"),  # braced numerator: the denominator stays bare
        ("3/4", "\\frac{3}{4}"),
        ("3/4/5", "3/4/5"),
        ("", ""),
    ],
)
def test_strip_latex_steps(text, expected):
    assert strip_latex(text) == expected


def test_fix_helpers():
    assert fix_sqrt("\\sqrt2+\\sqrt{3}") == "\\sqrt{2}+\\sqrt{3}"
    assert fix_fracs("\\frac12") == "\\frac{1}{2}"
    assert fix_fracs("\\frac1{2}") == "\\frac{1}{2}"
    assert fix_fracs("\\frac1") == "\\frac1"  # malformed: the input comes back
    assert fix_a_slash_b("10/4") == "\\frac{10}{4}"
    assert fix_a_slash_b("+1/2") == "+1/2"  # not canonical
    assert fix_a_slash_b("x/2") == "x/2"


# -- equality (is_equal, eval_tuple) ----------------------------------------------------------------


@pytest.mark.parametrize(
    "gt,answer,expected",
    [
        ("\\frac{1}{2}", "0.5", True),  # fractions by value
        ("\\frac{25}{7}", "3.57", True),  # 3.5714 rounds to 3.57
        ("\\frac{25}{7}", "3.58", False),
        ("$4 \\pi$", "4\\pi", True),  # \pi: math.pi
        ("$4 \\pi$", "12.57", True),
        ("2.72", "e", False),  # latex2sympy gives sympy's E, which math's names do not define
        ("(1,2)", "(1, 2)", True),  # tuples element-wise
        ("(1,2)", "(2,1)", False),
        ("(0.5,3)", "(\\frac{1}{2},3)", True),
        ("(a,\\infty)", "(a,\\infty)", True),
        ("c", "c", True),  # letters compare as strings (after lower-casing)
        ("C", "c", True),
        ("12", "12cm", False),  # units left in the answer fail
        ("60", "60°", False),
        ("13/8", "1.63", False),  # round(1.625, 2) == 1.62 (binary float)
        ("13/8", "1.62", True),
        ("5", "", False),
        ("", "5", False),
        ("  ", "  ", False),
    ],
)
def test_is_equal_edge_cases(gt, answer, expected):
    assert is_equal(gt, answer) is expected


def test_eval_tuple():
    assert eval_tuple("(\\frac{1}{2},3)") == "(0.5,3)"
    assert eval_tuple("[1,\\pi]") == "[1,3.14]"
    assert eval_tuple("(a,-a)") == "(a,-a)"  # "a" / "-a" kept as written
    assert eval_tuple("(1)") == "(1)"  # one element: unchanged
    assert eval_tuple("(x,1)") == "(x,1)"  # a failing element leaves the whole string


def test_a_pathological_answer_times_out_and_the_judge_recovers():
    with EqualityJudge(timeout_s=1.0) as judge:
        assert judge.equal("1", "2").equal is False  # starts the worker
        stuck = judge._proc
        # a 370-million-digit integer: hangs without a limit. The call runs in a thread only so that a broken
        # limit fails the test instead of hanging the suite; how long it takes is not what is checked.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            verdict = pool.submit(judge.equal, "1", "9^{9^{9}}").result(timeout=600)
        assert verdict.timed_out and not verdict.equal
        assert judge.timeouts == 1
        assert stuck.returncode == -signal.SIGKILL  # the stuck worker was killed, not left computing
        assert judge.equal("\\frac{1}{2}", "0.5").equal  # a fresh worker answers
        assert judge._proc is not stuck and judge.timeouts == 1


# -- aggregation ------------------------------------------------------------------------------------


def test_official_result_format():
    entries = [("algebra", 1, True), ("algebra", 1, False), ("algebra", 2, False), ("logic", 1, True)]
    result = official_result_dict(entries)
    assert list(result) == sorted(result)
    assert result["-all"] == "2/4=50.0%"
    assert result["-level1"] == "2/3=66.67%"
    assert result["algebra"] == "1/3=33.33%"
    assert result["algebra_level2"] == "0/1=0.0%"
    assert result["-level1_logic"] == "1/1=100.0%"


def test_accuracy_table_and_slugs():
    table = accuracy_table([("metric geometry - area", 1, True), ("metric geometry - area", 2, False)])
    assert table[0] == {"subject": "metric geometry - area", "n": 2, "all": 50.0, "level1": 100.0,
                        "level2": 0.0, "level3": None, "level4": None, "level5": None}  # fmt: skip
    assert table[-1]["subject"] == "all"
    assert slug("metric geometry - area") == "metric_geometry_area"


# -- data and prompts -------------------------------------------------------------------------------


def test_loader_reads_a_checkout_a_data_file_and_a_hf_parquet_copy(tmp_path):
    from_dir = load_problems(FIXTURES, "test")
    from_file = load_problems(FIXTURES / "data" / "testmini.jsonl")
    assert [p.id for p in from_dir] == [str(i) for i in range(1, 9)]
    assert [p.id for p in from_file] == ["1", "3", "5"]
    assert all(isinstance(p.image, Path) and p.image.is_file() for p in from_dir)
    assert from_dir[1].option_answer == "$\\frac{1}{3}$" and from_dir[2].option_answer == ""

    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    rows = [json.loads(line) for line in (FIXTURES / "data" / "test.jsonl").read_text().splitlines()]
    for row in rows:
        row["decoded_image"] = {"bytes": (FIXTURES / row["image"]).read_bytes(), "path": None}
    (tmp_path / "data").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "data" / "test-00000-of-00001.parquet")
    from_parquet = load_problems(tmp_path, "test")
    assert [(p.id, p.answer, p.options, p.level) for p in from_parquet] == [
        (p.id, p.answer, p.options, p.level) for p in from_dir
    ]
    assert isinstance(from_parquet[0].image, bytes)


def test_missing_data_fails_naming_benchmark_path(tmp_path):
    with pytest.raises(BenchmarkDataError, match="benchmark.path"):
        build_benchmark(MathVConfig(path=str(tmp_path / "nowhere")))
    with pytest.raises(BenchmarkDataError, match="benchmark.path"):
        build_benchmark(MathVConfig(path=str(tmp_path)))  # exists, holds no test.jsonl
    with pytest.raises(BenchmarkDataError, match="benchmark.path is not set"):
        build_benchmark(MathVConfig(path=None))


def test_missing_images_are_reported_and_skipped(tmp_path, caplog):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.jsonl").write_text((FIXTURES / "data" / "test.jsonl").read_text())
    (tmp_path / "images").mkdir()
    for i in (1, 2, 3):
        (tmp_path / "images" / f"{i}.jpg").write_bytes((FIXTURES / "images" / f"{i}.jpg").read_bytes())
    bench = build_benchmark(MathVConfig(path=str(tmp_path)))
    assert [r.id for r in bench.records()] == ["1", "2", "3"]
    assert bench.missing_images == ["4", "5", "6", "7", "8"]
    assert "skipped: 4, 5, 6, 7, 8" in caplog.text


def _problem(**kw) -> MathVProblem:
    base = {"id": "1", "question": "<image1> Q?", "options": [], "answer": "1", "level": 1, "subject": "algebra",
            "image_ref": None}
    return MathVProblem(**(base | kw))


def test_prompts():
    abcde = _problem(options=list("ABCDE"))
    latex = _problem(options=["$1$", "$2$", "$3$", "$4$", "$5$"])
    cot = render_prompt(latex, "cot")
    assert cot.startswith('Please solve the problem and put your answer in one "\\boxed{}". If it is a multiple')
    assert cot.endswith("<image1> Q?\n(A) $1$\n(B) $2$\n(C) $3$\n(D) $4$\n(E) $5$\n")
    assert render_prompt(abcde, "cot").endswith("<image1> Q?\n")  # letters only: drawn in the image
    assert render_prompt(_problem(), "direct") == "<image1> Q?\n\nAnswer the question using a single word or phrase."
    lmms = render_prompt(abcde, "lmms_eval")
    assert lmms.startswith('Please solve the problem step by step and put your answer in one "\\boxed{}".<image1> Q?')
    assert lmms.endswith("\nChoices: A. A\nB. B\nC. C\nD. D\nE. E\nAnswer the question with the option's letter "
                         "from the given choices directly.")  # fmt: skip


# -- score-only command -----------------------------------------------------------------------------


@pytest.mark.parametrize("folder,name", [(FIXTURES, "fixture_model"), (CASES, "cases")])
def test_score_command_writes_the_official_files(tmp_path, folder, name, capsys):
    args = ["score", "--data", str(folder / "data" / "test.jsonl"), "--responses",
            str(folder / "outputs" / f"{name}.jsonl"), "--out-dir", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    expected = folder / "expected"
    assert (tmp_path / f"{name}_result.json").read_bytes() == (expected / f"{name}_result.json").read_bytes()
    ours = _jsonl(tmp_path / f"{name}_scored.jsonl")
    theirs = _jsonl(expected / f"{name}.jsonl")
    assert ours == theirs  # the input line plus model_answer and correct, key order included
    assert f"{name}.jsonl :\t " in capsys.readouterr().out


def test_score_command_reports_unknown_ids_and_null_responses(tmp_path, capsys):
    lines = [{"id": "1", "response": "\\boxed{C}"}, {"id": "404", "response": "1"}, {"id": "3", "response": None},
             {"id": "1", "response": "\\boxed{C}"}, {"id": 5, "response": "\\boxed{25/7}"}]  # fmt: skip
    responses = tmp_path / "out.jsonl"
    responses.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert main(["score", "--data", str(FIXTURES), "--responses", str(responses)]) == 0
    err = capsys.readouterr().err
    assert "unknown id (skipped): 404" in err and "null response (scored wrong): 3" in err
    result = json.loads((tmp_path / "out_result.json").read_text())
    assert result["-all"] == "3/4=75.0%"  # duplicates count twice, the unknown id not at all
    scored = _jsonl(tmp_path / "out_scored.jsonl")
    assert [s["correct"] for s in scored] == [True, False, True, True]


def test_score_command_with_bad_data_path_says_so(tmp_path, capsys):
    assert main(["score", "--data", str(tmp_path / "none.jsonl"), "--responses", str(tmp_path / "r.jsonl")]) == 2
    assert "--data" in capsys.readouterr().err


def test_score_command_runs_as_a_module(tmp_path):
    cmd = [sys.executable, "-m", "mmprune_exp.benchmarks.mathv", "score", "--data", str(FIXTURES / "data" / "test.jsonl"),
           "--responses", str(FIXTURES / "outputs" / "fixture_model.jsonl"), "--out-dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "fixture_model.jsonl :\t 4/8=50.0%" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr


def test_score_responses_api():
    problems = {p.id: p for p in load_problems(FIXTURES)}
    report = score_responses(problems, [{"id": "4", "response": "\\boxed{4\\pi}"}], timeout_s=None)
    assert report.result["-all"] == "1/1=100.0%" and report.lines[0]["model_answer"] == "4\\pi"


# -- through the evaluation runner ------------------------------------------------------------------


class ScriptedAdapter:
    """Answers each request from a dict keyed by prompt text; records the images it was given."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.image_sizes: list[tuple[int, int]] = []

    def generate(self, requests, max_new_tokens):
        for r in requests:
            self.image_sizes += [img.size for img in r.images]
        return [self.answers.get(r.text, "") for r in requests]


def test_benchmark_run_matches_the_official_numbers(tmp_path):
    bench = build_benchmark(MathVConfig(path=str(FIXTURES), batch_size=3, max_new_tokens=8))
    records = bench.records()
    responses = {line["id"]: line["response"] for line in _jsonl(FIXTURES / "outputs" / "fixture_model.jsonl")}
    adapter = ScriptedAdapter({r.request.text: responses[r.id] for r in records})
    result = evaluate(adapter, bench, tmp_path / "samples.jsonl")
    assert adapter.image_sizes == [(56, 56)] * 8  # one merged image per problem, decoded on demand
    assert result.metrics["score"] == 0.5
    assert result.metrics["acc/level/1"] == 0.5 and result.metrics["acc/subject/algebra"] == 1.0
    assert result.metrics["acc/subject_level/metric_geometry_angle/3"] == 1.0
    assert result.metrics["unparsed"] == 1.0  # the empty response
    written = bench.write_tables(result.rows, tmp_path)
    assert [p.name for p in written] == ["mathv_result.json", "mathv_table.csv"]
    assert (tmp_path / "mathv_result.json").read_bytes() == (FIXTURES / "expected" / "fixture_model_result.json").read_bytes()
    rows = _jsonl(tmp_path / "samples.jsonl")
    assert {r["id"]: r["model_answer"] for r in rows} == {
        x["id"]: x["model_answer"] for x in _jsonl(FIXTURES / "expected" / "fixture_model.jsonl")
    }


def test_mini_split_and_config_composition(compose_cfg):
    from omegaconf import OmegaConf

    from mmprune_exp.config import ConfigError, validate

    cfg = compose_cfg(["benchmark=mathv_mini", f"benchmark.path={FIXTURES}", "benchmark.prompt=direct"])
    validate(cfg)
    bench = build_benchmark(OmegaConf.to_object(cfg.benchmark))
    assert bench.name == "mathv_mini" and [r.id for r in bench.records()] == ["1", "3", "5"]
    assert bench.records()[0].request.text.endswith("Answer the question using a single word or phrase.")
    with pytest.raises(ConfigError, match=r"benchmark\.prompt"):
        validate(compose_cfg(["benchmark=mathv", "benchmark.prompt=fancy"]))
    with pytest.raises(ConfigError, match=r"benchmark\.split"):
        validate(compose_cfg(["benchmark=mathv", "benchmark.split=train"]))


TINY = ROOT / "mmprune_exp" / "assets" / "qwen2_5_vl_tiny"
# Development hook, as in tests/test_run_e2e.py: run against another checkpoint directory.
MODEL_OVERRIDE = [f"model.path={os.environ['MMPRUNE_TEST_MODEL']}"] if os.environ.get("MMPRUNE_TEST_MODEL") else []


@pytest.mark.skipif(not MODEL_OVERRIDE and not (TINY / "config.json").exists(), reason="the tiny model is not built yet")
def test_run_py_on_the_tiny_model(tmp_path):
    env = os.environ | {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    args = [sys.executable, "run.py", f"hydra.run.dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}",
            "model.device=cpu", *MODEL_OVERRIDE, "pruner=none", "logger=none", "dense_baseline=false", "benchmark=mathv_mini",
            f"benchmark.path={FIXTURES}", "benchmark.max_new_tokens=8", "benchmark.batch_size=3"]  # fmt: skip
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["n_samples"] == 3 and 0.0 <= results["score"] <= 1.0
    assert "acc/level/1" in results["metrics"]
    # The run's figures are the official scorer's on the run's own responses, and every problem was asked.
    rows = _jsonl(tmp_path / "samples.jsonl")
    assert [r["id"] for r in rows] == [p["id"] for p in _jsonl(FIXTURES / "data" / "testmini.jsonl")]
    problems = {p.id: p for p in load_problems(FIXTURES / "data" / "testmini.jsonl")}
    official = score_responses(problems, [{"id": r["id"], "response": r["response"]} for r in rows], timeout_s=None)
    assert json.loads((tmp_path / "mathv_mini_result.json").read_text()) == official.result
    assert json.loads((tmp_path / "mathv_mini_result.json").read_text())["-all"].startswith(
        f"{round(results['score'] * 3)}/3="
    )
