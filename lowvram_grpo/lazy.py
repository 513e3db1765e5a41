"""Names a package exports, imported on first use: importing the package stays fast and does
not pull in torch, and importing one submodule does not import the others.

A package ends with `lazy_exports(__name__, _EXPORTS)`; its class becomes `LazyPackage` (a
module's class may be replaced for custom attribute access: the Python reference, "Customizing
module attribute access").
"""

from __future__ import annotations

import sys
import types
from importlib import import_module
from typing import Any


class LazyPackage(types.ModuleType):
    """A package whose `_exports` map each public name to the submodule that defines it."""

    _exports: dict[str, str]

    def __getattr__(self, name: str) -> Any:  # only for names not (yet) set on the package
        if name not in self._exports:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(import_module(f"{self.__name__}.{self._exports[name]}"), name)
        setattr(self, name, value)  # cache: later lookups skip this method
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        # Loading a submodule sets the package's attribute of its name to it. Where the package
        # exports an object of that very name (lowvram_grpo.evaluate, the function, from the
        # submodule evaluate), the object must win, whichever is imported first.
        if self._exports.get(name) == name and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(vars(self)) | set(self._exports))


def lazy_exports(package: str, exports: dict[str, str]) -> None:
    """Make `package` (a module already in sys.modules) import its `exports` on first use."""
    module = sys.modules[package]
    vars(module)["_exports"] = exports
    module.__class__ = LazyPackage
