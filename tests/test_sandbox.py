"""`code_tests` and its sandbox: right and wrong solutions, and each attack contained.

Every attack is a "solution" whose tests pass only if the attack succeeds, so "contained"
reads as "scores 0", checked together with the side effect itself (no file, no connection, no
process left) and the time it took (within its limit).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from lowvram_grpo.rewards.base import RewardFunctionError
from lowvram_grpo.rewards.code import CodeTests, extract_code, outputs_match
from lowvram_grpo.rewards.loading import resolve_reward
from lowvram_grpo.rewards.sandbox import SANDBOX_UID_BASE, SandboxLimits, isolation_report, run_many

LIMITS = SandboxLimits(wall_seconds=3.0, cpu_seconds=2, memory_bytes=256 * 2**20)
CONFINED = isolation_report()


def score(code: str, tests: list, limits: SandboxLimits = LIMITS) -> float | None:
    reward = CodeTests(limits=limits)
    completion = f"Here is my solution:\n```python\n{textwrap.dedent(code)}\n```\n"
    return reward(prompts=["p"], completions=[completion], tests=[tests])[0]


def sandbox_processes() -> list[int]:
    """Processes running as one of the sandbox's uids (there must be none between calls)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid >= SANDBOX_UID_BASE:
                found.append(int(pid))
        except FileNotFoundError:
            pass
    return found


ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]


# --- solutions -----------------------------------------------------------------------------------


def test_correct_partly_correct_and_wrong_solutions():
    assert score("def add(a, b):\n    return a + b", ADD_TESTS) == 1.0
    assert score("def add(a, b):\n    return a + b if a > 0 else 99", ADD_TESTS) == pytest.approx(2 / 3)
    assert score("def add(a, b):\n    return a - b", ADD_TESTS) == 0.0
    assert score("this is not python", ADD_TESTS) == 0.0


def test_stdin_stdout_pairs_compare_output_lines():
    tests = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10"}]
    assert score("a, b = map(int, input().split())\nprint(a + b)", tests) == 1.0
    assert score("a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)", tests) == 0.5
    assert outputs_match("3  \n\n", "3") and not outputs_match("3\n4", "3")


def test_a_row_without_tests_is_not_applicable_and_a_missing_column_names_itself():
    reward = CodeTests(limits=LIMITS)
    assert reward(prompts=["p", "p"], completions=["x = 1", "x = 1"], tests=[None, []]) == [None, None]
    with pytest.raises(RewardFunctionError, match="`tests` column"):
        reward(prompts=["p"], completions=["x = 1"])


def test_code_is_taken_from_the_last_python_block_or_the_whole_completion():
    assert extract_code("```\nA\n```\ntext ```python\nB\n``` and ```py\nC\n```") == "C\n"
    assert extract_code("```\nA\n```") == "A\n"
    assert extract_code("def f(): pass") == "def f(): pass"
    assert extract_code("sure:\n```python\ndef f():\n    return 1") == "def f():\n    return 1"


def test_code_tests_is_a_builtin_with_trls_signature():
    fn = resolve_reward("code_tests")
    assert fn(prompts=["p"], completions=[[{"role": "assistant", "content": "def add(a, b): return a + b"}]],
              tests=[ADD_TESTS]) == [1.0]


def test_a_program_may_start_a_few_processes_of_its_own():
    code = """
    import subprocess, sys
    def add(a, b):
        return int(subprocess.check_output([sys.executable, "-c", f"print({a} + {b})"]))
    """
    assert score(code, ADD_TESTS) == 1.0


def test_printing_a_lot_does_not_hide_the_results():
    code = "def add(a, b):\n    print('x' * 200_000)\n    return a + b"
    assert score(code, ADD_TESTS) == 1.0


def test_faked_results_and_early_exit_score_zero():
    # The harness reports passes with a token the solution never sees: printing lookalike
    # lines or exiting before the asserts run earns nothing.
    fake = "import sys, os\nfor i in range(3):\n    print('0' * 32, i)\nos._exit(0)"
    assert score(fake, ADD_TESTS) == 0.0
    assert score("raise SystemExit(0)", ADD_TESTS) == 0.0


# --- attacks -------------------------------------------------------------------------------------


def test_infinite_loop_is_stopped_at_the_time_limit():
    started = time.monotonic()
    assert score("def add(a, b):\n    while True:\n        pass", ADD_TESTS) == 0.0
    assert time.monotonic() - started < LIMITS.wall_seconds + 2


def test_sleeping_forever_is_stopped_at_the_wall_time_limit():
    started = time.monotonic()
    assert score("import time\ntime.sleep(60)\ndef add(a, b): return a + b", ADD_TESTS) == 0.0
    assert time.monotonic() - started < LIMITS.wall_seconds + 2


def test_memory_bomb_is_refused_by_the_memory_limit():
    code = """
    def add(a, b):
        hog = []
        while True:
            hog.append(bytearray(50 * 2**20))
    """
    started = time.monotonic()
    assert score(code, ["assert add(1, 2) is None"]) == 0.0
    assert time.monotonic() - started < LIMITS.wall_seconds + 2


def test_fork_bomb_is_contained_and_no_process_outlives_the_call():
    code = """
    import os
    def add(a, b):
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """
    started = time.monotonic()
    assert score(code, ADD_TESTS) == 0.0
    assert time.monotonic() - started < LIMITS.wall_seconds + 3
    assert sandbox_processes() == []


def test_a_daemon_that_leaves_the_process_group_does_not_outlive_the_call(tmp_path):
    code = """
    import os, time
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            time.sleep(30)
        os._exit(0)
    def add(a, b): return a + b
    """
    assert score(code, ADD_TESTS) == 1.0  # the solution itself is right
    time.sleep(0.2)
    assert sandbox_processes() == []


def test_output_flood_is_cut_and_scores_zero():
    code = """
    import sys
    def add(a, b):
        while True:
            sys.stdout.write("x" * 65536)
    """
    started = time.monotonic()
    reward = score(code, ["assert add(1, 2) == 3"])
    assert reward == 0.0
    assert time.monotonic() - started < LIMITS.wall_seconds + 2
    flood = run_many([{"files": {"f.py": "while True: print('y' * 1000)"}, "argv": ["f.py"], "limits": LIMITS}])[0]
    assert len(flood.stdout) <= LIMITS.output_bytes


def test_writing_outside_the_working_directory_is_refused(tmp_path):
    outside = [tmp_path / "pwned", os.path.join(os.getcwd(), "pwned-by-sandbox"),
               os.path.expanduser("~/pwned-by-sandbox"), "/etc/pwned-by-sandbox"]
    code = f"""
    def add(a, b):
        written = 0
        for path in {[str(p) for p in outside]!r}:
            try:
                with open(path, "w") as f:
                    f.write("x")
                written += 1
            except OSError:
                pass
        return written
    """
    assert score(code, ["assert add(1, 2) > 0"]) == 0.0
    for path in outside:
        assert not os.path.exists(path), path
    # Its working directory and /tmp are its own: writes succeed there and are gone afterwards.
    code = "open('scratch.txt', 'w').write('ok')\nopen('/tmp/pwned-by-sandbox', 'w').write('ok')\n" \
           "def add(a, b): return a + b"
    assert score(code, ADD_TESTS) == 1.0
    assert not os.path.exists("/tmp/pwned-by-sandbox")


def test_the_trainers_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_for_the_test")
    code = f"""
    import os
    def leaked():
        found = [v for v in os.environ.values()]
        for pid in ("1", str(os.getppid()), "{os.getpid()}"):
            try:
                found.append(open(f"/proc/{{pid}}/environ").read())
            except OSError:
                pass
        return "hf_secret_for_the_test" in " ".join(found)
    """
    assert score(code, ["assert leaked()"]) == 0.0
    assert score(code, ["assert not leaked()"]) == 1.0  # the probe itself ran


@pytest.mark.skipif(not CONFINED["network_namespace"], reason="no network namespace on this machine")
def test_no_network_connection_can_be_opened():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    port = server.getsockname()[1]
    accepted = []

    def accept():
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            try:
                accepted.append(server.accept())
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept)
    thread.start()
    code = f"""
    import socket
    def connected():
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=1).sendall(b"hi")
            return True
        except OSError:
            return False
    """
    assert score(code, ["assert connected()"]) == 0.0
    thread.join()
    server.close()
    assert accepted == []


# --- parallelism ---------------------------------------------------------------------------------


def test_programs_run_in_parallel_bounded_by_the_workers():
    program = "import time\nstart = time.monotonic()\ntime.sleep(0.4)\nprint(start, time.monotonic())"
    jobs = [{"files": {"p.py": program}, "argv": ["p.py"], "limits": LIMITS} for _ in range(4)]
    spans = [tuple(map(float, r.stdout.split())) for r in run_many(jobs, workers=2)]
    most_at_once = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert most_at_once == 2


# --- a trainer that is not root ------------------------------------------------------------------

NON_ROOT_CHECK = """
import json, os
from lowvram_grpo.rewards.code import CodeTests
from lowvram_grpo.rewards.sandbox import SandboxLimits, isolation_report
attacks = {
    "network": "import socket\\ndef f():\\n    socket.create_connection(('127.0.0.1', 22), timeout=1)\\n    return 1",
    "write": "def f():\\n    open(%r, 'w').write('x')\\n    return 1",
    "fork bomb": "import os\\ndef f():\\n    while True:\\n        try: os.fork()\\n        except OSError: pass",
    "subprocess": "import subprocess, sys\\n"
                  "def f():\\n    return int(subprocess.check_output([sys.executable, '-c', 'print(1)']))",
}
reward = CodeTests(limits=SandboxLimits(wall_seconds=3, cpu_seconds=2))
scores = {name: reward(prompts=['p'], completions=[code], tests=[['assert f() == 1']])[0]
          for name, code in attacks.items()}
print(json.dumps({"uid": os.getuid(), "report": isolation_report(), "scores": scores}))
"""


@pytest.mark.skipif(os.getuid() != 0 or not shutil.which("unshare"), reason="needs root to pose as another user")
def test_a_non_root_trainer_gets_the_same_containment_through_a_user_namespace(tmp_path):
    # `unshare --user --map-user=1000` runs the trainer as uid 1000 with no privileges on the
    # machine, as on a desktop: the sandbox must then confine through a user namespace.
    target = tmp_path / "pwned"
    script = NON_ROOT_CHECK % str(target)
    repo = str(Path(__file__).resolve().parents[1])
    result = subprocess.run(["unshare", "--user", "--map-user=1000", "--map-group=1000", sys.executable, "-c", script],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": repo})
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["uid"] == 1000 and out["report"]["user_namespace"] and out["report"]["network_namespace"]
    assert out["scores"]["network"] == 0.0 and out["scores"]["write"] == 0.0 and out["scores"]["fork bomb"] == 0.0
    assert out["scores"]["subprocess"] == 1.0  # a program may still start a few processes of its own
    assert not target.exists()


def test_a_python_installed_under_tmp_stays_visible_to_the_program(tmp_path):
    """The program gets a private /tmp; a trainer whose Python lives under /tmp (a project or
    virtualenv cloned there, as a CI job may be) must still be able to start it."""
    venv = tmp_path / "venv"  # pytest's tmp_path is under /tmp
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from lowvram_grpo.rewards.sandbox import run_program; "
              "r = run_program({'a.py': 'print(6 * 7)'}, ['a.py']); print(r.stdout.strip(), r.returncode)")
    result = subprocess.run([str(venv / "bin" / "python"), "-c", script, repo], capture_output=True, text=True,
                            timeout=120)
    assert str(venv).startswith("/tmp/") and sys.prefix != str(venv)
    assert result.stdout.split() == ["42", "0"], result.stderr[-2000:]
