"""Entry-point plugins: discovery, its errors, the off switch, and a real plugin package trained by `opdlab fit`."""

from __future__ import annotations

import csv
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from opdlab import cli, plugins
from opdlab.divergences import Divergence, ReverseKL
from opdlab.selectors import TeachabilitySelector, TokenSelector

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "examples" / "opdlab-plugin-example"
EXAMPLE_DIST = "opdlab-plugin-example"
REAL_ENTRY_POINTS = importlib.metadata.entry_points
SELECTOR_BASE = "opdlab.selectors.base.TokenSelector"


class GoodSelector(TokenSelector):
    def score(self, stats, generator=None):
        return stats.compatibility


class AbstractSelector(TokenSelector):
    """Forgets to implement `score`."""


class FakeEntryPoint:
    """Quacks like importlib.metadata.EntryPoint: name, value, group, dist.name, load()."""

    def __init__(self, name: str, package: str, obj=None, error: Exception | None = None, group="opdlab.selectors",
                 value: str | None = None) -> None:
        self.name, self.group, self.obj, self.error = name, group, obj, error
        self.value = value or f"{package.replace('-', '_')}:{getattr(obj, '__name__', 'Thing')}"
        self.dist = SimpleNamespace(name=package)

    def load(self):
        if self.error is not None:
            raise self.error
        return self.obj


@pytest.fixture
def fresh_registry(monkeypatch):
    """Clear the registry's cache around the test (scan is functools.cache'd) and drop the off switch."""
    monkeypatch.delenv(plugins.DISABLE_ENV, raising=False)
    plugins.scan.cache_clear()
    yield
    plugins.scan.cache_clear()


@pytest.fixture
def fake_plugins(monkeypatch, fresh_registry):
    """`fake_plugins(*eps)` adds fake entry points to the real ones (opdlab's built-ins)."""

    def install(*extra: FakeEntryPoint) -> None:
        def entry_points(**kwargs):
            group = kwargs.get("group")
            return [*REAL_ENTRY_POINTS(**kwargs), *(ep for ep in extra if ep.group == group)]

        monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
        plugins.scan.cache_clear()

    return install


# --------------------------------------------------------------------------------------------- discovery
def test_builtins_are_registered_through_entry_points(fresh_registry):
    selectors = plugins.discover("opdlab.selectors")
    divergences = plugins.discover("divergence")  # the short alias names the same group
    assert selectors["teachability"].cls is TeachabilitySelector
    assert selectors["teachability"].package == "opdlab"
    assert selectors["teachability"].class_path == "opdlab.selectors.teachability.TeachabilitySelector"
    assert divergences["reverse_kl"].cls is ReverseKL
    assert {"full", "random", "entropy", "divergence", "teachability", "incompatible", "compatibility", "tip",
            "tip_q3", "teachability_entropy"} <= set(selectors)
    assert {"sampled_token", "forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"} <= set(divergences)
    assert all(issubclass(p.cls, Divergence) for p in divergences.values())
    assert plugins.discover("opdlab.selectors") is selectors  # idempotent: loaded once


def test_third_party_plugin_is_registered_with_its_package(fake_plugins):
    fake_plugins(FakeEntryPoint("good", "acme-opd", GoodSelector))
    plugin = plugins.discover("opdlab.selectors")["good"]
    assert (plugin.cls, plugin.package) == (GoodSelector, "acme-opd")
    assert plugins.resolve("opdlab.selectors", "good") is GoodSelector
    assert plugin in plugins.list_plugins()


def test_duplicate_name_names_both_packages(fake_plugins):
    fake_plugins(FakeEntryPoint("teachability", "acme-opd", GoodSelector))
    with pytest.raises(plugins.PluginError) as err:
        plugins.discover("opdlab.selectors")
    message = str(err.value)
    assert "'teachability'" in message and "'acme-opd'" in message and "'opdlab'" in message
    assert "rename" in message


def test_same_class_declared_twice_is_not_a_duplicate(fake_plugins):
    # e.g. a package visible twice on sys.path: the same name and the same class.
    fake_plugins(FakeEntryPoint("good", "acme-opd", GoodSelector), FakeEntryPoint("good", "acme-opd", GoodSelector))
    assert plugins.discover("opdlab.selectors")["good"].cls is GoodSelector


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (FakeEntryPoint("broken", "acme-opd", error=ImportError("No module named 'acme_opd'")),
         "failed to import: ImportError: No module named 'acme_opd'"),
        (FakeEntryPoint("notaclass", "acme-opd", obj=lambda stats: stats), "not a subclass of " + SELECTOR_BASE),
        (FakeEntryPoint("wrongbase", "acme-opd", obj=ReverseKL), "not a subclass of " + SELECTOR_BASE),
        (FakeEntryPoint("abstract", "acme-opd", obj=AbstractSelector), "is abstract (it does not implement score)"),
        (FakeEntryPoint("Bad.Name", "acme-opd", obj=GoodSelector), "malformed name"),
    ],
    ids=["import-error", "not-a-class", "wrong-interface", "abstract", "malformed-name"],
)
def test_broken_plugin_error_names_plugin_and_package(fake_plugins, entry, expected):
    fake_plugins(entry)
    with pytest.raises(plugins.PluginError) as err:
        plugins.discover("opdlab.selectors")
    message = str(err.value)
    assert f"plugin {entry.name!r}" in message and "from package 'acme-opd'" in message
    assert expected in message
    assert f"{plugins.DISABLE_ENV}=1" in message  # says what to do


def test_wrong_group_interface_for_divergences(fake_plugins):
    fake_plugins(FakeEntryPoint("sel_as_div", "acme-opd", GoodSelector, group="opdlab.divergences"))
    with pytest.raises(plugins.PluginError, match="not a subclass of opdlab.divergences.base.Divergence"):
        plugins.discover("opdlab.divergences")


def test_off_switch_keeps_only_builtins(fake_plugins, monkeypatch):
    fake_plugins(FakeEntryPoint("broken", "acme-opd", error=ImportError("boom")),
                 FakeEntryPoint("good", "acme-opd", GoodSelector))
    monkeypatch.setenv(plugins.DISABLE_ENV, "1")
    selectors = plugins.discover("opdlab.selectors")
    assert "good" not in selectors and "broken" not in selectors
    assert {p.package for p in selectors.values()} == {"opdlab"}
    with pytest.raises(ValueError, match=f"{plugins.DISABLE_ENV} is set"):
        plugins.resolve("opdlab.selectors", "good")


def test_unknown_name_suggests_closest_and_lists_all(fresh_registry):
    with pytest.raises(ValueError) as err:
        plugins.resolve("opdlab.selectors", "teachabilty")
    message = str(err.value)
    assert message.startswith("unknown selector 'teachabilty'. Did you mean 'teachability'")
    assert all(name in message for name in plugins.discover("opdlab.selectors"))
    with pytest.raises(ValueError, match="unknown divergence 'reverse-kl'. Did you mean 'reverse_kl'"):
        plugins.resolve("opdlab.divergences", "reverse-kl")
    with pytest.raises(ValueError, match="unknown plugin group"):
        plugins.discover("opdlab.optimizers")


def test_cli_unknown_short_name_exits_with_suggestion(fresh_registry):
    with pytest.raises(SystemExit) as err:
        cli.main(["fit", "--model.selector", "teachabilty"])
    assert "Did you mean 'teachability'" in str(err.value.code)


def test_plugins_command_lists_package(fake_plugins, capsys):
    fake_plugins(FakeEntryPoint("good", "acme-opd", GoodSelector))
    cli.main(["plugins"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["group", "name", "package", "class"]
    assert any(line.split()[:3] == ["selectors", "good", "acme-opd"] for line in lines)
    assert any(line.split()[:3] == ["divergences", "reverse_kl", "opdlab"] for line in lines)


# --------------------------------------------------------------------------------------------- a real plugin package
def _can_build_offline() -> str | None:
    """Why `pip install --no-build-isolation -e` cannot work here, or None if it can."""
    try:
        import setuptools
    except ImportError:
        return "setuptools is not installed in the test environment (pip install 'setuptools>=70.1')"
    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    if (major, minor) < (70, 1):
        try:
            import wheel  # noqa: F401 - setuptools < 70.1 builds (editable) wheels through it
        except ImportError:
            return f"setuptools {setuptools.__version__} needs the `wheel` package to build offline"
    return None


def _is_installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def example_plugin_installed():
    """Install examples/opdlab-plugin-example (editable, offline) into this environment; uninstall afterwards."""
    was_installed = _is_installed(EXAMPLE_DIST)
    if not was_installed:
        reason = _can_build_offline()
        if reason:
            pytest.skip(reason)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
             "-e", str(EXAMPLE)],
            check=True, capture_output=True, text=True,
        )
    yield EXAMPLE_DIST
    plugins.scan.cache_clear()
    if not was_installed:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", EXAMPLE_DIST], check=False,
                       capture_output=True)


def run_opdlab(args: list[str], cwd: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != plugins.DISABLE_ENV}
    result = subprocess.run(
        [sys.executable, "-m", "opdlab.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout, check=False,
    )
    assert result.returncode == 0, f"opdlab {args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_example_plugin_package_trains_through_opdlab_fit(example_plugin_installed, tiny_checkpoints, tmp_path):
    listing = run_opdlab(["plugins"], tmp_path).stdout.splitlines()
    assert any(line.split()[:3] == ["selectors", "low_confidence", EXAMPLE_DIST] for line in listing), listing

    run_opdlab(
        [
            "fit", "--model.student", tiny_checkpoints.student, "--model.teacher", tiny_checkpoints.teacher,
            "--model.selector", "low_confidence", "--model.selector.ratio", "0.2", "--model.rollout.max_new_tokens", "4",
            "--data.source", "opdlab.tasks.AdditionTask", "--data.source.digits", "2", "--data.source.num_eval", "8",
            "--data.batch_size", "8", "--data.val_batch_size", "8",
            "--trainer.max_steps", "3", "--trainer.accelerator", "cpu", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--trainer.callbacks+=opdlab.callbacks.TokenBank", f"--trainer.callbacks.path={tmp_path / 'bank.csv'}",
        ],
        tmp_path,
    )
    config = next((tmp_path / "runs").rglob("config.yaml")).read_text()
    assert "class_path: opdlab_plugin_example.LowConfidenceSelector" in config

    with open(tmp_path / "bank.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["step"] for r in rows} == {"1", "2", "3"}
    for step in ("1", "2", "3"):
        kept = [r["kept"] == "True" for r in rows if r["step"] == step]
        sequences = {r["sequence"] for r in rows if r["step"] == step}
        budget = -(-len(kept) // 5)  # ceil(0.2 · N_valid)
        assert budget <= sum(kept) <= budget + len(sequences)


def test_contract_tests_pick_up_the_installed_plugin(example_plugin_installed, tmp_path):
    """The registry-parametrised contract tests run on the plugin selector without any change."""
    env = {k: v for k, v in os.environ.items() if k != plugins.DISABLE_ENV}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(REPO_ROOT / "tests" / "test_selectors.py"), "-q", "-k", "low_confidence",
         "-p", "no:cacheprovider"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout and "deselected" in result.stdout


def test_example_plugin_imports_without_side_effects():
    """Loading the plugin module defines a class and nothing else (no registration by import)."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        import opdlab_plugin_example as example
    finally:
        sys.path.remove(str(EXAMPLE))
    selector = example.LowConfidenceSelector(ratio=0.5)
    assert isinstance(selector, TokenSelector) and selector.top_k == 1
    assert example.__all__ == ["LowConfidenceSelector"]


# --------------------------------------------------------------------------------------------- opdlab plugins
def test_plugins_command_lists_healthy_plugins_and_reports_broken_ones(fake_plugins):
    fake_plugins(FakeEntryPoint("good", "acme-opd", GoodSelector),
                 FakeEntryPoint("broken", "acme-bad", error=ImportError("No module named 'acme_bad'")),
                 FakeEntryPoint("quitter", "acme-exit", error=SystemExit(3)))
    from conftest import run_opdlab as run_in_process

    result = run_in_process(["plugins"])
    assert result.code == 1
    assert "good" in result.out and "acme-opd" in result.out and "teachability" in result.out  # healthy ones listed
    assert "2 broken plugin(s), not loaded:" in result.out
    assert "plugin 'broken' (acme_bad:Thing) from package 'acme-bad'" in result.out and "ImportError" in result.out
    assert "plugin 'quitter'" in result.out and "SystemExit: 3" in result.out  # sys.exit at import is caught
    with pytest.raises(plugins.PluginError, match="acme-bad"):  # fit and the rest refuse to go on
        plugins.discover("opdlab.selectors")


def test_example_plugin_own_tests_use_the_installed_contract_checks(example_plugin_installed, tmp_path):
    """The plugin package's own pytest (outside opdlab's tests/) runs opdlab.testing's checks on it."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(EXAMPLE / "tests"), "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout
