"""`code_tests`: run the completion's code against the row's tests, in the sandbox.

The dataset's `tests` column (or the one `code_tests_column` names) holds, per row, either
- assert statements, `["assert add(1, 2) == 3", ...]` (MBPP, HumanEval-style): the code is
  run once, then each assert, in the same process; or
- input/output pairs, `[{"input": "1 2\\n", "output": "3\\n"}, ...]` (stdin/stdout programs,
  Codeforces-style): the code is run once per pair and its output compared line by line,
  trailing whitespace ignored.
(A JSON string holding such a list works too, for CSV files.)

The reward is the fraction of tests passed; None for rows without tests. The code is the last
```python block of the completion (else the last ``` block, else the whole completion).
Every run happens in `sandbox.run_program`, several at once (bounded by the cores).

An assert test counts as passed only when the harness itself reports it, with a random token
the code cannot see in its output: code that prints fake results or exits early scores 0.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import dataclass, field

from lowvram_grpo.rewards.base import RewardFunctionError, completion_text
from lowvram_grpo.rewards.sandbox import SandboxError, SandboxLimits, describe_isolation, isolation_report, run_many

_FENCE_RE = re.compile(r"```([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)

# Runs the solution as a module (so an `if __name__ == "__main__":` block does not run), then
# each assert. The token arrives on stdin before the solution runs; results go to a duplicate
# of stdout that the solution does not know about, while what the solution prints goes to
# /dev/null (so however much it prints, the report is never cut off).
ASSERT_HARNESS = """\
import json, os, sys

def _harness():
    token = sys.stdin.readline().strip()
    with open("tests.json", encoding="utf-8") as f:
        tests = json.load(f)
    report = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    namespace = {"__name__": "solution"}
    try:
        with open("solution.py", encoding="utf-8") as f:
            exec(compile(f.read(), "solution.py", "exec"), namespace)
    except BaseException as e:
        print(f"solution failed: {type(e).__name__}: {e}", file=sys.stderr)
        return
    for i, test in enumerate(tests):
        try:
            exec(compile(test, f"test {i}", "exec"), namespace)
        except BaseException as e:
            print(f"test {i} failed: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        report.write(f"{token} {i}\\n")
        report.flush()

_harness()
"""


def extract_code(text: str) -> str:
    """The last ```python (or ```py) block, else the last ``` block, else the whole text. A
    block cut off by the length limit (no closing fence) counts from its opening fence on."""
    blocks = _FENCE_RE.findall(text)
    python = [code for lang, code in blocks if lang.lower() in ("python", "py", "python3")]
    if python or blocks:
        return (python or [code for _, code in blocks])[-1]
    if text.count("```") % 2 == 1:  # an opening fence without its closing one
        after = text[text.rfind("```") + 3:]
        return after.split("\n", 1)[1] if "\n" in after else ""
    return text


def parse_tests(value) -> list | None:
    """A row's tests as a list of assert strings or of {input, output} dicts; None for none."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = [value]  # a single assert statement
    if not isinstance(value, (list, tuple)):
        raise RewardFunctionError(
            f"reward function 'code_tests': the `tests` column must hold a list of assert statements or of "
            f"{{input, output}} pairs, got {type(value).__name__}")
    tests = list(value)
    for test in tests:
        ok = isinstance(test, str) or (isinstance(test, dict) and {"input", "output"} <= set(test))
        if not ok:
            raise RewardFunctionError(
                f"reward function 'code_tests': each test is an assert statement (text) or "
                f"{{input: ..., output: ...}}, got {test!r:.80}")
    return tests or None


def outputs_match(got: str, expected: str) -> bool:
    """Line by line, trailing whitespace and trailing empty lines ignored."""
    def lines(text: str) -> list[str]:
        return [line.rstrip() for line in str(text).rstrip().splitlines()]

    return lines(got) == lines(expected)


@dataclass
class CodeTests:
    """Fraction of the row's `tests` (asserts or stdin/stdout pairs) the code passes, sandboxed.

    A callable object rather than a function so the sandbox's limits and parallelism can come
    from the config (`code_tests_from_config`); it has TRL's reward signature all the same.
    """

    limits: SandboxLimits = field(default_factory=SandboxLimits)
    workers: int | None = None  # programs at once; None = the cores
    column: str = "tests"  # the dataset column holding each row's tests
    __name__ = "code_tests"

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        if self.column not in kwargs:
            raise RewardFunctionError(
                f"reward function 'code_tests' needs a `{self.column}` column in the dataset: per row a list of "
                f"assert statements or of {{input, output}} pairs; set code_tests_column=<column> if it has "
                f"another name (columns given: {sorted(kwargs) or 'none'})")
        try:
            isolation_report()  # a sandbox that cannot start is a setup problem: say so once, clearly
        except SandboxError as err:
            raise RewardFunctionError(f"reward function 'code_tests': {err}") from None
        jobs, owners = [], []  # owners[j] = (completion index, test index or None for "all asserts")
        tokens, all_tests = [], []
        for i, (completion, raw) in enumerate(zip(completions, kwargs[self.column])):
            tests = parse_tests(raw)
            all_tests.append(tests)
            tokens.append(secrets.token_hex(16))
            if not tests:
                continue
            code = extract_code(completion_text(completion))
            asserts = [t for t in tests if isinstance(t, str)]
            if asserts:
                files = {"harness.py": ASSERT_HARNESS, "solution.py": code, "tests.json": json.dumps(asserts)}
                jobs.append({"files": files, "argv": ["harness.py"], "stdin": tokens[i] + "\n", "limits": self.limits})
                owners.append((i, None))
            for j, test in enumerate(tests):
                if isinstance(test, dict):
                    jobs.append({"files": {"solution.py": code}, "argv": ["solution.py"],
                                 "stdin": str(test["input"]), "limits": self.limits})
                    owners.append((i, j))
        results = run_many(jobs, self.workers)
        passed = [0] * len(completions)
        for (i, j), result in zip(owners, results):
            if j is None:
                reported = {line.split()[1] for line in result.stdout.splitlines()
                            if line.startswith(tokens[i] + " ") and len(line.split()) == 2}
                passed[i] += len(reported)
            elif result.returncode == 0 and not result.timed_out and \
                    outputs_match(result.stdout, all_tests[i][j]["output"]):
                passed[i] += 1
        return [None if not tests else passed[i] / len(tests) for i, tests in enumerate(all_tests)]


def code_tests_from_config(config) -> CodeTests:
    """`code_tests` with the config's code_* limits. Says in the log what the sandbox confines
    on this machine, and stops with one clear line if it cannot start at all."""
    try:
        print(describe_isolation(isolation_report()), flush=True)
    except SandboxError as err:
        raise RewardFunctionError(f"reward function 'code_tests': {err}") from None
    wall = float(config.code_timeout_s)
    return CodeTests(limits=SandboxLimits(wall_seconds=wall, cpu_seconds=max(1, math.ceil(wall)),
                                          memory_bytes=int(config.code_memory_mb) * 2**20),
                     workers=config.code_workers or None, column=config.code_tests_column)

