"""Tested versions: constraints.txt pins what the suite passed with, and `scripts/test --latest`
names the upgraded library that breaks it."""

import importlib.util
import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def _latest_releases():
    spec = importlib.util.spec_from_file_location("latest_releases", ROOT / "scripts" / "latest_releases.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]


def test_constraints_pin_every_dependency_and_extra():
    latest = _latest_releases()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    tested = latest.tested_versions()
    unpinned = sorted({_requirement_name(r) for r in requirements} - set(tested), key=str.lower)
    unpinned = [name for name in unpinned if latest.canonical(name) not in tested]
    assert unpinned == [], f"add these to constraints.txt (the versions the suite passed with): {unpinned}"


def test_the_readme_names_the_tested_versions():
    tested = _latest_releases().tested_versions()
    readme = (ROOT / "README.md").read_text()
    assert f"pip install torch=={tested['torch']}" in readme
    assert "-c constraints.txt" in readme
    for name in ("transformers", "peft", "bitsandbytes", "accelerate", "trl", "gradio"):
        assert f"{name} {tested[name]}" in readme, f"the README's tested-versions line should say {name} {tested[name]}"


def test_a_failing_latest_run_names_the_library_that_breaks_it(monkeypatch, capsys):
    latest = _latest_releases()
    installed = {"transformers": "9.0.0", "peft": "0.22.0", "bitsandbytes": "0.51.0"}
    monkeypatch.setattr(latest, "tested_versions", lambda: {"transformers": "5.25.0", "peft": "0.22.0",
                                                             "bitsandbytes": "0.50.2"})
    monkeypatch.setattr(latest.metadata, "version", lambda name: installed.get(name) or
                        (_ for _ in ()).throw(latest.metadata.PackageNotFoundError(name)))

    def pip_install(requirement):
        name, version = requirement.split("==")
        installed[name] = version

    monkeypatch.setattr(latest, "pip_install", pip_install)
    # The suite breaks under transformers 9, whatever bitsandbytes is.
    monkeypatch.setattr(latest, "pytest", lambda args: int(installed["transformers"] == "9.0.0"))

    assert latest.main([]) == 1
    output = capsys.readouterr().out
    assert "bitsandbytes: 0.50.2 -> 0.51.0" in output and "transformers: 5.25.0 -> 9.0.0" in output
    assert "transformers 9.0.0 breaks the suite (it passes with the tested transformers 5.25.0)" in output
    assert installed == {"transformers": "9.0.0", "peft": "0.22.0", "bitsandbytes": "0.51.0"}, \
        "every library goes back to its newest release after the search"
