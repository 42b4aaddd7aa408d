"""Every file under configs/ parses with the command it is written for, as `--print_config` parses it: every
option and class_path is checked against the real signatures, and nothing is built or trained. Where a file
sits says how it is used: top-level files are fit configs, selectors/ and data/ hold overlays on
configs/ta_opd.yaml, diagnose/ holds `opdlab diagnose` configs, eval/ `opdlab eval` settings. A new config is covered without editing
this file; one anywhere else fails until `opdlab_args` learns how to parse it."""

from __future__ import annotations

import importlib

import pytest
import yaml
from conftest import CONFIG_DIR, REPO_ROOT, run_opdlab

BASE = CONFIG_DIR / "ta_opd.yaml"
OVERLAY_DIRS = ("selectors", "data", "adapters")  # their header comments: `opdlab fit --config configs/ta_opd.yaml --config ...`
KINDS = (".", *OVERLAY_DIRS, "diagnose", "eval")
CONFIGS = sorted(p for p in CONFIG_DIR.rglob("*") if p.is_file())
DATA_OVERLAYS = sorted((CONFIG_DIR / "data").glob("*.y*ml"))
MISSING = object()


def name(path) -> str:
    return path.relative_to(REPO_ROOT).as_posix()


def opdlab_args(path) -> list[str] | None:
    """The `opdlab` arguments that parse a config, by the directory it is in (None: no rule for it)."""
    kind = path.parent.relative_to(CONFIG_DIR).as_posix()
    if kind == ".":
        return ["fit", "--config", str(path)]
    if kind in OVERLAY_DIRS:
        return ["fit", "--config", str(BASE), "--config", str(path)]
    if kind == "diagnose":
        return ["diagnose", "--config", str(path)]
    if kind == "eval":
        return ["eval", "--config", str(path)]
    return None


def same_class(given: str, printed: str) -> bool:
    """A class_path may be printed under another import path, or expanded from a bare class name."""
    if "." not in given:
        return printed.rsplit(".", 1)[-1] == given
    return named_object(given) is named_object(printed)


def named_object(path: str):
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def differences(given, printed, key: str = "") -> list[str]:
    """Keys set in a config file (`given`) whose value the printed config does not have."""
    if isinstance(given, dict):
        if not isinstance(printed, dict):
            return [key]
        return [d for k, v in given.items() for d in differences(v, printed.get(k, MISSING), f"{key}.{k}".lstrip("."))]
    if isinstance(given, list):
        if not isinstance(printed, list) or len(printed) != len(given):
            return [key]
        return [d for i, (g, p) in enumerate(zip(given, printed)) for d in differences(g, p, f"{key}[{i}]")]
    if key.endswith("class_path") and isinstance(given, str) and isinstance(printed, str):
        return [] if same_class(given, printed) else [key]
    if isinstance(given, str) and isinstance(printed, float):  # YAML 1.1 reads `1e-4` as a string
        try:
            return [] if float(given) == printed else [key]
        except ValueError:
            return [key]
    return [] if given == printed else [key]


def test_every_kind_of_config_is_found():
    """An empty glob (configs/ moved, a directory renamed) would make the parametrized tests below collect
    nothing, which pytest reports as skipped rather than failed."""
    found = {p.parent.relative_to(CONFIG_DIR).as_posix() for p in CONFIGS}
    assert set(KINDS) <= found, f"no config file found in configs/ for: {sorted(set(KINDS) - found)}"


@pytest.mark.parametrize("path", CONFIGS, ids=name)
def test_config_parses_and_keeps_its_values(path, monkeypatch):
    """A shipped config whose option was renamed or removed, whose class_path moved, whose value has the wrong
    type, or whose value the parser drops or overrides, fails here and not in a user's first run. An overlay is
    compared after its base: a selector overlay on configs/ta_opd.yaml prints the overlay's selector class."""
    args = opdlab_args(path)
    assert args, f"{name(path)}: no rule says how to parse configs in {name(path.parent)}/; add one to opdlab_args"
    assert path.suffix in (".yaml", ".yml"), f"{name(path)} is not a YAML config"
    monkeypatch.setenv("OPDLAB_TRACEBACK", "1")  # the parser's whole message: opdlab's own keeps its first line
    result = run_opdlab([*args, "--print_config"])
    command = "opdlab " + " ".join(a.replace(f"{REPO_ROOT}/", "") for a in args) + " --print_config"
    assert result.code == 0, f"{name(path)} does not parse: `{command}` exits with {result.code}\n{result.err[-3000:]}"
    given, printed = yaml.safe_load(path.read_text()), yaml.safe_load(result.out)
    wrong = differences(given, printed)
    assert not wrong, f"{name(path)}: `{command}` prints other values for {wrong}"


def test_a_value_the_parser_does_not_keep_is_reported():
    """The comparison above is not vacuous: another selector class, init arg or trainer value is found."""
    printed = yaml.safe_load(run_opdlab(["fit", "--config", str(BASE), "--print_config"]).out)
    given = {"model": {"selector": {"class_path": "opdlab.selectors.RandomSelector", "init_args": {"ratio": 0.3}}},
             "trainer": {"max_steps": 7, "logger": {"init_args": {"name": "ta_opd"}}}}
    assert differences(given, printed) == ["model.selector.class_path", "model.selector.init_args.ratio",
                                           "trainer.max_steps"]


@pytest.mark.parametrize("path", DATA_OVERLAYS, ids=name)
def test_data_overlay_names_shipped_files(path):
    """A data overlay runs as is from the repository root (its header and the README say so), so every data
    file it names is in the repository (paths are relative to where opdlab runs)."""
    init_args = yaml.safe_load(path.read_text())["data"]["source"]["init_args"]
    files = [init_args[k] for k in ("train_path", "eval_path", "test_path") if init_args.get(k)]
    assert files, f"{name(path)} names no data file"
    missing = [f for f in files if not (REPO_ROOT / f).is_file()]
    assert not missing, f"{name(path)} names files that are not in the repository: {missing}"
