"""The package's public names (lowvram_grpo, lowvram_grpo.rewards) are imported on first use:
`import lowvram_grpo` pulls in neither torch nor a submodule, and every exported name resolves
to the object its submodule defines."""

import importlib
import subprocess
import sys

import pytest


def test_importing_the_package_imports_no_submodule_and_not_torch():
    code = ("import sys, lowvram_grpo, lowvram_grpo.rewards; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('lowvram_grpo.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['lowvram_grpo.lazy', 'lowvram_grpo.rewards']"


@pytest.mark.parametrize("package", ["lowvram_grpo", "lowvram_grpo.rewards"])
def test_every_exported_name_is_its_submodules_object(package):
    module = importlib.import_module(package)
    for name, submodule in module._EXPORTS.items():
        assert getattr(module, name) is getattr(importlib.import_module(f"{package}.{submodule}"), name), name
    assert set(module.__all__) <= set(dir(module))
    with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'nope'"):
        _ = module.nope
