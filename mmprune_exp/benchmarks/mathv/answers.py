"""MATH-Vision answer extraction and equality, rule for rule as the official scorer applies them.

Reproduces mathllm/MATH-V ``evaluation/evaluate.py`` (extraction, L14-48) and ``evaluation/utils.py``
(``find_math_answer``, ``_strip_string`` and its helpers, ``eval_tuple``, ``is_equal``) at commit a1f5cc3,
as recorded in shared/reference/benchmarks.md §3.2. The code is written afresh; every step keeps the
official order, because several steps interact (e.g. the "is <number>" rule runs before the ``\\boxed``
check, and spaces are removed before ``\\,``).

Equality needs latex2sympy2 (1.9.1, the version the official results were made with) and evaluates the
printed sympy expression with Python's ``eval`` over the names of the ``math`` module, rounding both sides
to 2 decimals with Python's ``round``. That evaluation can run for ever (``\\boxed{9^{9^{9}}}`` builds a
370-million-digit integer in C code that no signal interrupts), so :class:`EqualityJudge` runs it in a
worker process that is killed when one comparison exceeds its time limit. A timed-out comparison counts
as "not equal" and is reported; the official scorer has no limit (it would hang).

This file also runs as a script (``python answers.py --serve``): that is the worker. It imports only
the standard library at module level, so the worker starts without torch.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import select
import subprocess
import sys
import time
from dataclasses import dataclass

# -- extraction (evaluate.py L21-45) ----------------------------------------------------------------

# Phrases after which the answer follows, tried in this order; each is tried lower-case, then with "the"
# capitalised (evaluate.py L29-39).
ANSWER_FLAGS = ("the final answer is", "the answer is", "the correct answer is", "the answer should be")
CHOICE_LETTERS = "ABCDE"


def is_number(text: str) -> bool:
    """True when Python's ``float`` accepts the text (so " 12 ", "1e3", "nan" and "inf" count)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _after_flag(answer: str, flag: str) -> str:
    """Keep what follows the last ``flag``; if the flag occurred, only up to the first line/sentence end."""
    tail = answer.split(flag)[-1].strip()
    if flag in answer:
        tail = tail.split("\n")[0].split(". ")[0]
    return tail


def extract_answer(response: str) -> str:
    """The answer string the official scorer compares with the ground truth (``model_answer``)."""
    answer = response.strip()
    # 1. A bare option letter at the end (" C.", " (C).") or at the start of the first line ("C\n", "(C)\n",
    #    "(C) C\n"). Once replaced by the letter nothing later in the loop can match again.
    for c in CHOICE_LETTERS:
        if answer.endswith((f" {c}.", f" ({c}).")) or answer.startswith((f"{c}\n", f"({c})\n", f"({c}) {c}\n")):
            answer = c
    # 2. "... is 12." -> "12" when the text after the last "is " is a number.
    tail = answer.split("is ")[-1].rstrip(".")
    if is_number(tail):
        answer = tail
    # 3. Without a \boxed: the text after "the answer is" and its variants. With several \boxed: keep the last.
    if "oxed{" not in answer:
        for flag in ANSWER_FLAGS:
            answer = _after_flag(answer, flag)
            answer = _after_flag(answer, flag.replace("the", "The"))
    elif answer.count("oxed{") > 1:
        answer = "\\boxed{" + answer.split("oxed{")[-1]
    # 4. LaTeX clean-up, then option letters written "(c)" or "{c}" become "c".
    answer = find_math_answer(answer)
    for c in "abcde":
        answer = answer.replace(f"({c})", c)
    for c in "abcde":
        answer = answer.replace(f"{{{c}}}", c)
    return answer.rstrip(".").lstrip(":").strip()


# -- normalisation (utils.py find_math_answer, _strip_string and helpers) ---------------------------

_BOXED = re.compile("oxed{(.*)}", flags=re.DOTALL)  # greedy: from the first "oxed{" to the last "}"

# find_math_answer's clean-up, applied in this order after the "=" / "\approx" split.
_ANSWER_CLEANUP = (
    (" ", ""), ("\\,", ""), ("∞", "\\infty"), ("+\\infty", "\\infty"), ("\\\\", "\\"), ("\n", ""),
    ("\\text", ""), ("\\mbox", ""), ("bmatrix", "pmatrix"), ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""),
    ("^\\circ", ""), ("{m}^3", ""), ("m^3", ""), ("{units}", ""), ("units", ""), ("{km}", ""), ("km", ""),
)  # fmt: skip

# _strip_string's replacements before the unit cut, in order.
_STRIP_REPLACEMENTS = (
    ("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"), ("\\left", ""), ("\\right", ""),
    ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", ""), ("$", ""),
)  # fmt: skip


def find_math_answer(text: str) -> str:
    """Lower-case, take the last ``\\boxed{...}`` content, the part after "=" / "\\approx", strip LaTeX."""
    text = text.lower()
    if "{}" in text:
        text = text.replace("{}", "")
    found = _BOXED.findall(text)
    answer = found[-1] if found else text
    # A "}" before any "{" closes the box early (text after the box): cut there.
    close, opening = answer.find("}"), answer.find("{")
    if close != -1 and (opening == -1 or close < opening):
        answer = answer.split("}")[0]
    answer = answer.split("=")[-1]
    answer = answer.split("\\approx")[-1]
    for old, new in _ANSWER_CLEANUP:
        answer = answer.replace(old, new)
    return strip_latex(answer)


def strip_latex(text: str) -> str:
    """MATH-style answer normalisation (the official ``_strip_string``), step by step in its order."""
    for old, new in _STRIP_REPLACEMENTS:
        text = text.replace(old, new)
    text = text.split("\\text{ ")[0]  # units written "\text{ cm}" are cut off
    text = text.replace("\\%", "")
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    if text[0] == ".":
        text = "0" + text
    # Only a single "=" (or "\approx") splits here; find_math_answer already split on the last one.
    if len(text.split("=")) == 2:
        text = text.split("=")[-1]
    if len(text.split("\\approx")) == 2:
        text = text.split("\\approx")[-1]
    if "sqrt" in text:
        text = fix_sqrt(text)
    text = text.replace(" ", "")
    if "sqrt" in text:  # the official code repairs \frac only when a sqrt is present
        text = fix_fracs(text)
    if text == "0.5":
        text = "\\frac{1}{2}"
    return fix_a_slash_b(text)


def fix_sqrt(text: str) -> str:
    """``\\sqrt2`` -> ``\\sqrt{2}``: brace a one-character radicand."""
    if "\\sqrt" not in text:
        return text
    head, *rest = text.split("\\sqrt")
    out = [head]
    for part in rest:
        out.append(f"\\sqrt{{{part[0]}}}{part[1:]}" if part and part[0] != "{" else "\\sqrt" + part)
    return "".join(out)


def fix_fracs(text: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{2}`` -> ``\\frac{1}{2}``; a malformed ``\\frac`` returns the input."""
    head, *rest = text.split("\\frac")
    out = [head]
    for part in rest:
        out.append("\\frac")
        if part and part[0] == "{":
            out.append(part)
            continue
        if len(part) < 2:
            return text
        num, den, tail = part[0], part[1], part[2:]
        out.append(f"{{{num}}}{{{den}}}{tail}" if den != "{" else f"{{{num}}}{den}{tail}")
    return "".join(out)


def fix_a_slash_b(text: str) -> str:
    """``3/4`` -> ``\\frac{3}{4}`` when both sides are plain integers written canonically."""
    parts = text.split("/")
    if len(parts) != 2:
        return text
    try:
        num, den = int(parts[0]), int(parts[1])
    except ValueError:
        return text
    if text != f"{num}/{den}":
        return text
    return f"\\frac{{{num}}}{{{den}}}"


# -- equality (utils.py eval_tuple, is_equal) --------------------------------------------------------

_LATEX2SYMPY = None
# The official utils.py evaluates sympy's printed expression in its module namespace, which holds
# `from math import *`: "pi", "e", "sqrt", "tau", "factorial" resolve to math's; anything else (a free
# symbol, sympy's "E", "I", "oo") raises, and the comparison is False.
_EVAL_NAMESPACE = {name: getattr(math, name) for name in dir(math) if not name.startswith("_")}


def _latex2sympy(text: str):
    global _LATEX2SYMPY
    if _LATEX2SYMPY is None:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its import parses a few strings too (see below)
                from latex2sympy2 import latex2sympy
        except ImportError as err:  # pragma: no cover - depends on the install
            raise ImportError(
                "MATH-V scoring needs latex2sympy2==1.9.1. Install it without its antlr pin (hydra needs "
                "antlr4-python3-runtime 4.9): `pip install --no-deps latex2sympy2==1.9.1` (`make install` does)."
            ) from err
        _LATEX2SYMPY = latex2sympy
    # latex2sympy2's parser was generated by ANTLR 4.7.2; the 4.9 runtime prints a version warning on
    # stdout each time it builds a parser (harmless: the serialized grammar format is the same).
    with contextlib.redirect_stdout(io.StringIO()):
        return _LATEX2SYMPY(text)


def latex_value(text: str):
    """``round(eval(str(latex2sympy(text))), 2)`` over the math names; raises when any step fails."""
    return round(eval(str(_latex2sympy(text)), dict(_EVAL_NAMESPACE)), 2)


def eval_tuple(text: str) -> str:
    """``"(1/2, \\pi)"`` -> ``"(0.5,3.14)"``: a bracketed list of >1 elements with each element's value.

    Elements containing "infty" and the elements "a" / "-a" stay as written; any failing element leaves
    the whole string unchanged (official ``eval_tuple``).
    """
    items = text[1:-1].split(",")
    if len(items) < 2 or (text[0], text[-1]) not in (("(", ")"), ("[", "]")):
        return text
    try:
        values = [item if "infty" in item or item in ("a", "-a") else str(latex_value(item)) for item in items]
    except Exception:  # noqa: BLE001 - official: any failure keeps the original string
        return text
    return text[0] + ",".join(values) + text[-1]


def is_equal_quick(first: str, second: str) -> bool | None:
    """The string-only part of :func:`is_equal`: True/False when decided, None when sympy must decide."""
    first, second = first.lower(), second.lower()
    if first.replace(" ", "") == "" or second.replace(" ", "") == "":
        return False
    if second.strip() == first.strip():
        return True
    return None


def is_equal(first: str, second: str) -> bool:
    """Official ``is_equal(asw, gt_asw)``; the scorer calls it as ``is_equal(gt, model_answer)``.

    Lower-case; blank -> False; equal after strip -> True; tuples/lists evaluated element-wise and compared
    as strings; else the 2-decimal rounded values of both sides (the second argument is evaluated first).
    """
    quick = is_equal_quick(first, second)
    if quick is not None:
        return quick
    first, second = eval_tuple(first.lower()), eval_tuple(second.lower())
    if second == first:
        return True
    try:
        return latex_value(second) == latex_value(first)
    except BaseException as err:
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        return False


# -- time-limited equality in a worker process -------------------------------------------------------


@dataclass
class Verdict:
    equal: bool
    timed_out: bool = False


class EqualityJudge:
    """Runs :func:`is_equal` in a long-lived worker process, with a time limit per comparison.

    The worker is started on first use (about a second: sympy + latex2sympy2 import) and restarted after a
    timeout. ``timeout_s=None`` compares in this process without a limit (tests, trusted inputs).
    Use as a context manager or call :meth:`close`; an unclosed worker exits when this process does (its
    stdin closes).
    """

    STARTUP_TIMEOUT_S = 120.0

    def __init__(self, timeout_s: float | None = 10.0):
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen | None = None
        self.timeouts = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # best effort; never raise from a finaliser
        with contextlib.suppress(Exception):
            self.close()

    def equal(self, first: str, second: str) -> Verdict:
        """:func:`is_equal` ``(first, second)`` under the time limit."""
        quick = is_equal_quick(first, second)
        if quick is not None:
            return Verdict(quick)
        if self.timeout_s is None:
            return Verdict(is_equal(first, second))
        return self._ask(first, second)

    def _start(self) -> None:
        env = os.environ | {"PYTHONDONTWRITEBYTECODE": "1"}
        self._proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        line = self._read_line(self.STARTUP_TIMEOUT_S)
        if line is None or json.loads(line).get("ready") is not True:
            self.close()
            raise RuntimeError("the MATH-V equality worker did not start (is latex2sympy2 installed?)")

    def _read_line(self, timeout: float) -> bytes | None:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + timeout
        buf = b""
        fd = self._proc.stdout.fileno()
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # the worker died
                return None
            buf += chunk
        return buf

    def _ask(self, first: str, second: str) -> Verdict:
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write((json.dumps([first, second]) + "\n").encode())
            self._proc.stdin.flush()
        except BrokenPipeError:
            self.close()
            return self._ask(first, second)
        line = self._read_line(self.timeout_s)
        if line is None:
            self.timeouts += 1
            self.close()  # kill the stuck worker; the next comparison starts a fresh one
            return Verdict(False, timed_out=True)
        return Verdict(bool(json.loads(line)["equal"]))

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(Exception):
                stream.close()


def serve() -> None:
    """Worker loop: one JSON ``[first, second]`` per input line, one ``{"equal": bool}`` per output line."""
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # anything a library prints must not corrupt the protocol
    _latex2sympy("1")  # import and warm up before announcing readiness
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        first, second = json.loads(line)
        out.write(json.dumps({"equal": is_equal(first, second)}) + "\n")


if __name__ == "__main__" and "--serve" in sys.argv[1:]:
    serve()
