"""Importing a user's own Python file (reward functions, tools, environments) as a module."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from lowvram_grpo.errors import one_line


class UserFileError(Exception):
    """A user's file that is not there, or that failed to import; the message says which."""


def import_user_file(source: str | Path) -> ModuleType:
    """The module of the Python file `source` (relative to the current directory), imported once.

    It gets a stable, unique module name per file, registered in sys.modules, so that dataclasses,
    pickling and lookups inside the user's module behave as in a normal import; and the file's
    folder is on sys.path while it runs, so it can import its sibling modules."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserFileError(f"file not found: {path.resolve()} (relative paths are relative to the current "
                            f"directory, {Path.cwd()})")
    path = path.resolve()
    name = f"lowvram_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except BaseException as err:
        del sys.modules[name]
        raise UserFileError(f"importing {path} failed: {one_line(err)}") from err
    finally:
        sys.path.remove(str(path.parent))
    return module
