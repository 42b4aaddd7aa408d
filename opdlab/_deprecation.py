"""Old import paths of public names that moved: they keep working for one release, with a DeprecationWarning
that names the new path (CHANGELOG.md lists them and the release that removes them)."""

from __future__ import annotations

import importlib
import warnings

REMOVED_IN = "0.3.0"


def moved_names(module: str, moved: dict[str, str]):
    """A module `__getattr__` resolving each name of `moved` (old name -> "new.module:name") with a warning."""

    def __getattr__(name: str):
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        target_module, _, target = moved[name].partition(":")
        warnings.warn(f"{module}.{name} moved to {target_module}.{target}; the old path is removed in opdlab "
                      f"{REMOVED_IN} (see CHANGELOG.md)", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(target_module), target)

    return __getattr__
