"""Entry-point plugins: selectors, divergences, rollout engines and teacher placements from any installed package.

Groups `opdlab.selectors`, `opdlab.divergences`, `opdlab.rollout_engines` and `opdlab.teacher_placements` map a short name to a class; opdlab registers its
own built-ins the same way (in its pyproject), so there is one mechanism. Discovery imports each entry
point once (idempotent, cached), checks that it is a concrete subclass of the group's interface, refuses
duplicate names, and records the package that supplied it. Every failure names the plugin and its
package. `OPDLAB_DISABLE_PLUGINS=1` keeps only opdlab's own entries (the off switch).

A plugin is declared in its own package's pyproject:

    [project.entry-points."opdlab.selectors"]
    low_confidence = "opdlab_plugin_example:LowConfidenceSelector"
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
from dataclasses import dataclass
from functools import cache
from importlib import metadata

from opdlab.console import OpdlabError
from opdlab.divergences.base import Divergence
from opdlab.engines.base import RolloutEngine
from opdlab.selectors.base import TokenSelector
from opdlab.teachers.base import TeacherPlacement

GROUPS: dict[str, type] = {
    "opdlab.selectors": TokenSelector, "opdlab.divergences": Divergence, "opdlab.rollout_engines": RolloutEngine,
    "opdlab.teacher_placements": TeacherPlacement,
}
GROUP_ALIASES = {"selector": "opdlab.selectors", "divergence": "opdlab.divergences",
                 "rollout_engine": "opdlab.rollout_engines", "teacher_placement": "opdlab.teacher_placements"}
BUILTIN_PACKAGE = "opdlab"
DISABLE_ENV = "OPDLAB_DISABLE_PLUGINS"
# Short names are used bare on the command line (`--model.selector teachability`), where a dot means a
# class path and a leading capital a class name, so names are lower-case identifiers.
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_\-]*")


class PluginError(OpdlabError, RuntimeError):
    """A plugin could not be registered (broken import, wrong type, duplicate or malformed name)."""


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


DISABLE_VALUES = {"1": True, "true": True, "yes": True, "on": True, "": False, "0": False, "false": False, "no": False,
                  "off": False}


def plugins_disabled() -> bool:
    """OPDLAB_DISABLE_PLUGINS: 1/true/yes/on turn third-party plugins off; unset, empty, 0/false/no/off leave them
    on. Any other value is refused (a typo must not silently flip the switch either way)."""
    value = os.environ.get(DISABLE_ENV, "").strip().lower()
    if value not in DISABLE_VALUES:
        raise PluginError(f"{DISABLE_ENV}={os.environ[DISABLE_ENV]!r} is not a yes/no value: set it to 1 to load only "
                          "opdlab's built-in plugins, or 0 (or unset it) to load every installed plugin")
    return DISABLE_VALUES[value]


def _package(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else "<unknown package>"


@cache
def scan(group: str) -> tuple[dict[str, Plugin], tuple[PluginError, ...]]:
    """(the healthy plugins of `group` by name, the errors of the broken ones), without raising.

    `opdlab plugins` lists both; everything else uses `discover`, which refuses to go on with a broken one.
    """
    group = GROUP_ALIASES.get(group, group)
    if group not in GROUPS:
        raise ValueError(f"unknown plugin group {group!r}; expected one of {sorted(GROUPS)}")
    found: dict[str, Plugin] = {}
    errors: list[PluginError] = []
    for ep in sorted(metadata.entry_points(group=group), key=lambda e: (_package(e), e.name)):
        package = _package(ep)
        if plugins_disabled() and package != BUILTIN_PACKAGE:
            continue
        try:
            plugin = _load(ep, group, package)
        except PluginError as err:
            errors.append(err)
            continue
        previous = found.get(plugin.name)
        if previous is not None and previous.cls is not plugin.cls:
            errors.append(PluginError(
                f"{_where(ep, group, package)} duplicates the name already registered by package "
                f"{previous.package!r} ({previous.target}); rename one of the entry points"
                f"{_off_switch_hint(package)}"
            ))
            continue
        found.setdefault(plugin.name, plugin)
    return found, tuple(errors)


def discover(group: str) -> dict[str, Plugin]:
    """Every plugin of `group` (a key of GROUPS, or its alias 'selector'/'divergence'/'rollout_engine'), by name.

    Raises PluginError naming the plugin and its package when one cannot be registered.
    """
    found, errors = scan(group)
    if errors:
        raise errors[0]
    return found



def _load(ep: metadata.EntryPoint, group: str, package: str) -> Plugin:
    """Import one entry point and check it; every error names the plugin and the package."""
    where, hint = _where(ep, group, package), _off_switch_hint(package)
    if not NAME_PATTERN.fullmatch(ep.name):
        raise PluginError(f"{where} has a malformed name: use lower-case letters, digits, '_' or '-'{hint}")
    try:
        cls = ep.load()
    except (Exception, SystemExit) as err:  # any import failure, sys.exit() at import included
        raise PluginError(f"{where} failed to import: {type(err).__name__}: {err}{hint}") from err
    base = GROUPS[group]
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PluginError(f"{where} is {cls!r}, not a subclass of {base.__module__}.{base.__name__}{hint}")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise PluginError(f"{where} is abstract (it does not implement {missing}){hint}")
    return Plugin(ep.name, group, cls, package, ep.value)


def _where(ep: metadata.EntryPoint, group: str, package: str) -> str:
    return f"plugin {ep.name!r} ({ep.value}) from package {package!r} in group {group!r}"


def _off_switch_hint(package: str) -> str:
    if package == BUILTIN_PACKAGE:
        return ""
    return f". Fix or uninstall {package!r}, or set {DISABLE_ENV}=1 to load only opdlab's built-ins"


def resolve(group: str, name: str) -> type:
    """The class registered as `name`; unknown names get the closest matches and the full list."""
    plugins = discover(group)
    if name in plugins:
        return plugins[name].cls
    raise ValueError(unknown_name_message(group, name, list(plugins)))


def unknown_name_message(group: str, name: str, known: list[str]) -> str:
    group = GROUP_ALIASES.get(group, group)
    kind = group.split(".")[-1].removesuffix("s")
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    disabled = f" (third-party plugins are off: {DISABLE_ENV} is set)" if plugins_disabled() else ""
    return f"unknown {kind} {name!r}.{hint} Available{disabled}: {', '.join(sorted(known))}"


def list_plugins() -> list[Plugin]:
    """Every registered plugin of every group, built-ins included (raises on a broken one)."""
    return [p for group in GROUPS for p in discover(group).values()]


def expand_short_names(argv: list[str], options: dict[str, str]) -> list[str]:
    """Turn registered plugin names into class paths in a command line, for the options mapped to their
    group (`{"--model.selector": "opdlab.selectors"}`: `--model.selector teachability` -> its class path).
    Unknown names raise with the closest matches."""
    out = list(argv)
    for i, arg in enumerate(out):
        key, eq, value = arg.partition("=")
        if key not in options:
            continue
        if not eq:
            if i + 1 >= len(out):
                continue
            value = out[i + 1]
        if "." in value or value.startswith(("{", "[")) or value[:1].isupper():
            continue  # a class path, a class name, or inline JSON: jsonargparse handles it
        path = resolve(options[key], value)
        path = f"{path.__module__}.{path.__qualname__}"
        if eq:
            out[i] = f"{key}={path}"
        else:
            out[i + 1] = path
    return out


def default_placement(teacher: str, need: str | None = None) -> TeacherPlacement:
    """The teacher placement a `--model.teacher` string implies when none is named: the registered placement that
    `accepts` it (a server placement claims its URL scheme), else `local` for a string without a scheme (a
    directory, hub id or `toy:` name). With its default options, or set up to give `need` (`for_needs`; e.g.
    `opdlab diagnose` needs the teacher's whole distribution)."""
    if not teacher.strip():
        raise ValueError("--model.teacher is empty; give a checkpoint directory, a hub id, a toy: name or a server URL")
    placements = discover("opdlab.teacher_placements")
    claimed = sorted(name for name, plugin in placements.items() if plugin.cls.accepts(teacher))
    if len(claimed) > 1:
        raise ValueError(f"teacher {teacher!r} is accepted by several teacher placements ({', '.join(claimed)}); name "
                         "one with --model.teacher_placement")
    build = (lambda cls: cls()) if need is None else (lambda cls: cls.for_needs(need))
    if claimed:
        return build(placements[claimed[0]].cls)
    from opdlab.teachers.base import has_scheme

    if has_scheme(teacher) or "local" not in placements:
        raise ValueError(f"no teacher placement accepts teacher {teacher!r} (installed: {', '.join(sorted(placements))}); "
                         "install the plugin that serves it, name one with --model.teacher_placement, or give a "
                         "checkpoint directory, hub id or toy: name")
    return build(placements["local"].cls)


def placement_name_for(teacher: str) -> str | None:
    """The registered name of the placement `default_placement(teacher)` picks (None where none does)."""
    try:
        cls = type(default_placement(teacher))
    except (ValueError, PluginError):
        return None
    return next((name for name, p in discover("opdlab.teacher_placements").items() if p.cls is cls), None)


def alternatives(role: str) -> str:
    """The registered components of `role` ("selector", "divergence") that a top-k teacher can serve (their
    declared needs decide), for `check_teacher_needs`'s message."""
    from opdlab.teachers.signal import NEEDS, need_of

    group = {"selector": "opdlab.selectors", "divergence": "opdlab.divergences"}.get(role)
    if group is None:
        return "see `opdlab plugins`"
    names = []
    for name, plugin in sorted(discover(group).items()):
        try:
            instance = plugin.cls()
        except Exception:  # noqa: BLE001 - a plugin whose defaults cannot be built is just not suggested
            continue
        if NEEDS.index(need_of(instance)) <= NEEDS.index("topk"):
            names.append(name)
    return "those that work with a top-k teacher: " + ", ".join(names) if names else "see `opdlab plugins`"
