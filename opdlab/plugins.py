"""Entry-point plugins: selectors and divergences from any installed package.

Groups `opdlab.selectors` and `opdlab.divergences` map a short name to a class; opdlab registers its
own built-ins the same way (in its pyproject), so there is one mechanism. Discovery imports each entry
point once (idempotent, cached), checks its type, refuses duplicate names, and records the package that
supplied it. `OPDLAB_DISABLE_PLUGINS=1` keeps only opdlab's own entries (the off switch).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points

from opdlab.divergences.base import Divergence
from opdlab.selectors.base import TokenSelector

GROUPS: dict[str, type] = {"opdlab.selectors": TokenSelector, "opdlab.divergences": Divergence}
GROUP_ALIASES = {"selector": "opdlab.selectors", "divergence": "opdlab.divergences"}


class PluginError(RuntimeError):
    """A plugin could not be registered (broken import, wrong type, duplicate name)."""


@dataclass(frozen=True)
class Plugin:
    name: str
    group: str
    cls: type
    package: str  # distribution that declared the entry point
    target: str  # "module:attr" as declared

    @property
    def class_path(self) -> str:
        return f"{self.cls.__module__}.{self.cls.__qualname__}"


@cache
def discover(group: str) -> dict[str, Plugin]:
    """Every plugin of `group` ('opdlab.selectors' or 'opdlab.divergences'), by name."""
    group = GROUP_ALIASES.get(group, group)
    if group not in GROUPS:
        raise ValueError(f"unknown plugin group {group!r}; expected one of {sorted(GROUPS)}")
    only_builtin = os.environ.get("OPDLAB_DISABLE_PLUGINS", "") not in ("", "0")
    found: dict[str, Plugin] = {}
    for ep in sorted(entry_points(group=group), key=lambda e: (e.dist.name if e.dist else "", e.name)):
        package = ep.dist.name if ep.dist else "<unknown package>"
        if only_builtin and package != "opdlab":
            continue
        where = f"plugin {ep.name!r} ({ep.value}) from package {package!r} in group {group!r}"
        try:
            cls = ep.load()
        except Exception as err:  # noqa: BLE001 - any import failure is reported the same way
            raise PluginError(f"{where} failed to import: {type(err).__name__}: {err}") from err
        if not (isinstance(cls, type) and issubclass(cls, GROUPS[group])):
            raise PluginError(f"{where} is {cls!r}, not a subclass of {GROUPS[group].__module__}.{GROUPS[group].__name__}")
        if ep.name in found and found[ep.name].cls is not cls:
            raise PluginError(
                f"{where} duplicates the name already registered by package {found[ep.name].package!r} "
                f"({found[ep.name].target}); rename one of the entry points"
            )
        found[ep.name] = Plugin(ep.name, group, cls, package, ep.value)
    return found


def resolve(group: str, name: str) -> type:
    """The class registered as `name`; unknown names get the closest matches and the full list."""
    plugins = discover(group)
    if name in plugins:
        return plugins[name].cls
    close = difflib.get_close_matches(name, list(plugins), n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown {group.split('.')[-1][:-1]} {name!r}.{hint} Available: {', '.join(sorted(plugins))}")


def list_plugins() -> list[Plugin]:
    return [p for group in GROUPS for p in discover(group).values()]
