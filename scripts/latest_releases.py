"""The test suite against today's newest releases (`bash scripts/test --latest`).

constraints.txt holds the versions the suite last passed with, and the README and CI install
exactly those. This run installs the newest releases instead (scripts/test does that, into
.venv-latest), lists what is newer than tested, and runs the suite. When it fails, each upgraded
library is put back to its tested version in turn and the failed tests run again: the library
whose return makes them pass is named, so an upstream break reads as "transformers 5.26.0
breaks us", not as a user's crash.

    python scripts/latest_releases.py [pytest args]
"""

from __future__ import annotations

import importlib.metadata as metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The libraries whose releases change what we compute or draw, in the order they are suspected.
LIBRARIES = ("bitsandbytes", "transformers", "peft", "accelerate", "trl", "kernels", "datasets", "tokenizers",
             "safetensors", "gradio", "huggingface-hub", "numpy")


def tested_versions(path: Path = ROOT / "constraints.txt") -> dict[str, str]:
    versions = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            versions[canonical(name)] = version.strip()
    return versions


def canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def upgraded(tested: dict[str, str]) -> list[tuple[str, str, str]]:
    """(library, tested version, installed version) for each library of LIBRARIES that differs."""
    rows = []
    for name in LIBRARIES:
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if name in tested and installed.split("+")[0] != tested[name]:
            rows.append((name, tested[name], installed))
    return rows


def pytest(args: list[str]) -> int:
    return subprocess.call([sys.executable, "-m", "pytest", *args], cwd=ROOT)


def pip_install(requirement: str) -> None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps", requirement])


def culprit(changes: list[tuple[str, str, str]], args: list[str]) -> tuple[str, str, str] | None:
    """The one upgrade whose tested version makes the failed tests pass again, if there is one."""
    for name, old, new in changes:
        print(f"\n--- failed tests again with {name} back at the tested {old} ---", flush=True)
        pip_install(f"{name}=={old}")
        try:
            if pytest(["--last-failed", "-q", *args]) == 0:
                return name, old, new
        finally:
            pip_install(f"{name}=={new}")
    return None


def main(args: list[str]) -> int:
    changes = upgraded(tested_versions())
    print("newer than tested (constraints.txt):" if changes else "every library is at its tested version")
    for name, old, new in changes:
        print(f"  {name}: {old} -> {new}")
    sys.stdout.flush()
    if pytest(args) == 0:
        print("\nlatest releases: the suite passes; constraints.txt can move to these versions")
        return 0
    if not changes:
        print("\nlatest releases: the suite fails with the tested versions themselves")
        return 1
    found = culprit(changes, args)
    if found:
        name, old, new = found
        print(f"\nlatest releases: {name} {new} breaks the suite (it passes with the tested {name} {old})")
    else:
        print("\nlatest releases: the suite fails, and no single library back at its tested version fixes it; "
              "upgraded: " + ", ".join(f"{n} {o} -> {v}" for n, o, v in changes))
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
