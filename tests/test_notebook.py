"""The Colab notebook (notebooks/lowvram_grpo_colab.ipynb).

- The committed notebook is exactly what notebooks/build_notebook.py generates, with no outputs.
- Its PRESET form field lists the package's presets, and it uses only the public API
  (`import lowvram_grpo as lg`, names from `lg.__all__`).
- It runs top to bottom, headless, on the offline tiny-cpu preset: a papermill-style
  "injected-parameters" cell after the "parameters" cell sets offline values.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "lowvram_grpo_colab.ipynb"
BUILDER = ROOT / "notebooks" / "build_notebook.py"
PARAMETERS = ("PRESET", "MAX_STEPS", "DATASET", "VRAM_GB", "OUTPUT_DIR", "EXTRA_OVERRIDES")


def load_builder():
    spec = importlib.util.spec_from_file_location("build_notebook", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def cell(nb, cell_id: str):
    matches = [c for c in nb.cells if c.get("id") == cell_id]
    assert len(matches) == 1, f"expected one cell with id {cell_id!r}"
    return matches[0]


def python_source(source: str) -> str:
    """A cell's source as plain Python (IPython magics become get_ipython() calls)."""
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(source)


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


# --- the committed file ------------------------------------------------------------------------


def test_committed_notebook_is_the_generated_one():
    assert NOTEBOOK.is_file(), "run: python notebooks/build_notebook.py"
    assert NOTEBOOK.read_text(encoding="utf-8") == load_builder().render(), (
        "notebooks/lowvram_grpo_colab.ipynb is stale: run python notebooks/build_notebook.py")


def test_committed_notebook_has_no_outputs():
    nb = read_notebook()
    nbformat.validate(nb)
    for c in code_cells(nb):
        assert c.outputs == [], f"cell {c.id} has outputs"
        assert c.execution_count is None, f"cell {c.id} has an execution count"


def test_parameters_cell_is_tagged_and_lists_every_preset():
    import lowvram_grpo as lg

    nb = read_notebook()
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    source = tagged[0].source
    assigned = {node.targets[0].id for node in ast.parse(source).body if isinstance(node, ast.Assign)}
    assert set(PARAMETERS) <= assigned
    preset_line = next(line for line in source.splitlines() if line.startswith("PRESET ="))
    default, choices = re.fullmatch(r'PRESET = "([^"]+)"\s+# @param (\[.*\])', preset_line).groups()
    assert sorted(json.loads(choices)) == lg.list_presets()
    assert default == "qwen2.5-3b-gsm8k"


def test_risky_actions_are_off_by_default():
    nb = read_notebook()
    for cell_id, flag in (("merge", "MERGE"), ("push-to-hub", "PUSH_TO_HUB"), ("upload", "UPLOAD_FILE")):
        assert re.search(rf"^{flag} = False\b", cell(nb, cell_id).source, re.MULTILINE), flag
    assert 'HUB_REPO_ID = "your-username/' in cell(nb, "push-to-hub").source


def test_notebook_uses_only_the_public_api():
    import lowvram_grpo as lg

    public = set(lg.__all__) | {"__version__"}
    for c in code_cells(read_notebook()):
        tree = ast.parse(python_source(c.source))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "lowvram_grpo":
                        assert alias.name == "lowvram_grpo", f"cell {c.id}: import {alias.name}"
                        assert alias.asname == "lg", f"cell {c.id}: import lowvram_grpo as {alias.asname}"
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "lowvram_grpo", (
                    f"cell {c.id}: from {node.module} import ...; use lg.<name>")
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "lg":
                assert node.attr in public, f"cell {c.id}: lg.{node.attr} is not in lowvram_grpo.__all__"


# --- running it --------------------------------------------------------------------------------


def python3_kernel(tmp_path: Path) -> Path:
    """A `python3` kernelspec that runs this interpreter (the venv's), whatever is installed
    in the user's Jupyter folders. Returns the folder to put first on JUPYTER_PATH."""
    jupyter = tmp_path / "jupyter"
    spec_dir = jupyter / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test)", "language": "python"}), encoding="utf-8")
    return jupyter


def set_flag(nb, cell_id: str, name: str, value) -> None:
    c = cell(nb, cell_id)
    source, count = re.subn(rf"^{name} = \S+", f"{name} = {value!r}", c.source, flags=re.MULTILINE)
    assert count == 1, f"{name} not found in cell {cell_id}"
    c.source = source


def text_output(c) -> str:
    parts = []
    for output in c.outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif "text/plain" in output.get("data", {}):
            parts.append(output.data["text/plain"])
    return "".join(parts)


def test_notebook_runs_offline_on_tiny_cpu(tiny_cache, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")

    nb = read_notebook()
    run_dir = tmp_path / "run"
    injected = nbformat.v4.new_code_cell("\n".join([
        "# Parameters (injected by tests/test_notebook.py)",
        'PRESET = "tiny-cpu"',
        "MAX_STEPS = 4",
        'DATASET = ""',
        "VRAM_GB = 16",
        f"OUTPUT_DIR = {str(run_dir)!r}",
        "EXTRA_OVERRIDES = {}",
    ]), id="injected-parameters", metadata={"tags": ["injected-parameters"]})
    position = nb.cells.index(cell(nb, "parameters")) + 1
    nb.cells.insert(position, injected)
    # Exercise the optional paths too (upload and push stay off: they need Colab / the network).
    set_flag(nb, "custom-reward", "USE_CUSTOM_REWARD", True)
    set_flag(nb, "plan", "USE_PLANNED_CHUNKS", True)
    set_flag(nb, "merge", "MERGE", True)
    set_flag(nb, "vision", "VISION_STEPS", 2)  # the vision example runs too, briefly
    nb.cells.append(nbformat.v4.new_code_cell(
        "assert torch.get_num_threads() == 1, torch.get_num_threads()", id="check-threads"))

    # The kernel inherits this environment: LOWVRAM_GRPO_CACHE (the tiny model) from the
    # tiny_cache fixture, a kernelspec for this interpreter, and a private IPython folder.
    monkeypatch.setenv("JUPYTER_PATH", str(python3_kernel(tmp_path)))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")

    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

    adapter = run_dir / "final"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (run_dir / "merged" / "config.json").is_file()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert "rewards/stops_after_answer/mean" in metrics[0]

    train = cell(nb, "train")
    images = [o for o in train.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1, "the live reward plot should be one image, updated in place"
    assert "adapter:" in text_output(train)

    assert "already installed" in text_output(cell(nb, "install"))
    def first_words(cell_id):
        return [line.split()[0] for line in text_output(cell(nb, cell_id)).splitlines() if line.strip()]

    assert first_words("numeric-answer") == ["1.0", "0.0", "1.0", "0.0"]
    assert first_words("format-soft") == ["1.0", "0.0", "0.0"]
    assert first_words("custom-reward")[:3] == ["1.0", "0.0", "None"]
    assert "Memory plan for" in text_output(cell(nb, "plan"))
    compare = text_output(cell(nb, "compare"))
    assert "metric" in compare and "accuracy" in compare
    assert "--- with the adapter ---" in text_output(cell(nb, "side-by-side"))
    assert "nothing uploaded" in text_output(cell(nb, "push-to-hub"))
    vision = cell(nb, "vision")
    assert re.search(r"\d of 6 counted right after 2 steps", text_output(vision)), text_output(vision)
    assert any("image/png" in o.get("data", {}) for o in vision.outputs), "the pictures with their answers"
