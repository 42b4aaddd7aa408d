"""The public API (docs/api.md) is a promise: every public name stays importable from its stable path; a name that
moved keeps working from its old path with a DeprecationWarning naming the new one; a plugin package written for
0.1.0 still installs, loads, passes the contract checks and trains; the version and the changelog agree."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from opdlab import plugins

from conftest import REPO_ROOT

# The public names, by stable path. Removing one fails here: keep it, or move it with a shim (DEPRECATED below)
# and a CHANGELOG entry. A name added to a public package's __all__ must be added here (test below).
PUBLIC = {
    "opdlab.selectors": [
        "TokenSelector", "FeatureSelector", "TokenStats", "normalize_scores", "apply_budget", "budget_size",
        "FullSelector", "RandomSelector", "EntropySelector", "DivergenceSelector", "TeachabilitySelector",
        "IncompatibleSelector", "CompatibilitySelector", "TeachabilityEntropySelector", "TipSelector", "TipQ3Selector",
    ],
    "opdlab.divergences": [
        "Divergence", "LossInputs", "log_softmax_fp32", "SampledTokenOPD", "ForwardKL", "ReverseKL",
        "GeneralizedJSD", "SkewKL", "TotalVariation",
    ],
    "opdlab.engines": [
        "RolloutEngine", "SamplingParams", "PromptBatch", "Rollout", "sampling_logprobs", "ReferenceEngine",
        "StaticCacheEngine", "VLLMEngine",
    ],
    "opdlab.tasks": [
        "PromptSource", "Problem", "AdditionTask", "SpelledAdditionTask", "ScratchpadAdditionTask", "JsonlPrompts",
        "DatasetPrompts",
    ],
    "opdlab.teachers": [
        "TeacherPlacement", "PendingTeacher", "TeacherRows", "ExactRows", "HeadRows", "DenseRows", "SparseRows",
        "TopLogprobs", "TeacherSignal", "TeacherLoadOptions", "TeacherError", "TeacherNeedError", "TeacherServerError",
        "check_teacher_needs", "is_url", "has_scheme", "LocalTeacher", "VLLMServerTeacher",
    ],
    "opdlab.testing": ["check_selector", "check_divergence", "check_rollout_engine", "top_logprobs_of"],
    "opdlab.adapters": ["AdapterOptions", "plain_parameters"],
    "opdlab.pipeline": ["PipelineOptions", "PipelineError"],
    "opdlab.evaluation": [
        "EvalOptions", "Benchmark", "EvalError", "check_config_files", "replacing_lists", "load_benchmark",
        "LoadedBenchmark", "Verifier", "response_limits", "resolve_model", "ModelSource", "load_model",
        "model_fingerprint", "hash_file_into", "plan_output", "OutputPlan", "read_responses", "ResponseSink",
        "evaluate", "tabulate", "markdown_table", "sampling_note", "run_greedy_accuracy", "verified", "greedy_accuracy",
    ],
    "opdlab": ["__version__"],
    # Paths the docs have taught and that stay (modules of the public types)
    "opdlab.scoring": ["TokenStats"],
    "opdlab.maths": ["log_softmax_fp32"],
    "opdlab.rollout": ["PromptBatch", "Rollout", "sampling_logprobs"],
    "opdlab.heads": ["LogitHead"],
    "opdlab.plugins": ["default_placement"],
}

# Old path -> new path, for names that moved; each warns until the release in opdlab._deprecation.REMOVED_IN.
DEPRECATED = {
    "opdlab.divergences.base.log_softmax_fp32": "opdlab.maths.log_softmax_fp32",
    "opdlab.divergences.base.token_log_prob": "opdlab.maths.token_log_prob",
    "opdlab.divergences.base.masked_kl": "opdlab.maths.masked_kl",
    "opdlab.models.LogitHead": "opdlab.heads.LogitHead",
    "opdlab.models.takes_argument": "opdlab.rollout.takes_argument",
    "opdlab.models.cache_keyword": "opdlab.rollout.cache_keyword",
    "opdlab.scoring.entropy_from_logp": "opdlab.maths.entropy_from_logp",
    "opdlab.scoring.union_kl": "opdlab.maths.union_kl",
    "opdlab.selectors.base.linear_quantiles": "opdlab.maths.linear_quantiles",
    "opdlab.teachers.default_placement": "opdlab.plugins.default_placement",
    "opdlab.teachers.base.default_placement": "opdlab.plugins.default_placement",
    "opdlab.scoring.logsumexp_entropy": "opdlab.chunks.logsumexp_entropy",
    "opdlab.module.choose_cpu_threads": "opdlab.building.choose_cpu_threads",
    "opdlab.module.non_finite_parameters": "opdlab.export.non_finite_parameters",
    "opdlab.module.readable_by_default": "opdlab.export.readable_by_default",
    **{f"opdlab.eval_cli.{name}": f"opdlab.evaluation.{name}" for name in [
        "EvalOptions", "Benchmark", "EvalError", "check_config_files", "replacing_lists", "load_benchmark",
        "response_limits", "hash_file_into", "evaluate", "load_model", "markdown_table"]},
}


def resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_import_from_their_stable_paths_without_warnings(module):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        mod = importlib.import_module(module)
        for name in PUBLIC[module]:
            assert hasattr(mod, name), f"{module}.{name} is public (docs/api.md) and is gone: restore it or add a shim"


@pytest.mark.parametrize("package", ["opdlab.selectors", "opdlab.divergences", "opdlab.engines", "opdlab.tasks",
                                     "opdlab.evaluation", "opdlab.pipeline"])
def test_every_exported_name_is_recorded_as_public(package):
    """`__all__` of a public package is the public API: a new name is recorded in PUBLIC (and docs/api.md)."""
    exported = set(importlib.import_module(package).__all__)
    assert exported == set(PUBLIC[package]), (exported ^ set(PUBLIC[package]))


@pytest.mark.parametrize("old, new", sorted(DEPRECATED.items()))
def test_moved_names_work_from_their_old_path_with_a_warning(old, new):
    with pytest.warns(DeprecationWarning, match=re.escape(f"{old} moved to {new}")):
        obj = resolve(old)
    assert obj is resolve(new)


def test_every_library_name_of_the_eval_command_works_from_its_old_path_with_a_warning():
    """opdlab.eval_cli held the evaluation library until 0.2.0: each of its library names (internal ones too, which
    fit and compare imported) still imports from there, warning that it moved to opdlab.evaluation."""
    from opdlab import eval_cli

    with pytest.warns(DeprecationWarning, match=re.escape("opdlab.eval_cli.EvalOptions moved to opdlab.evaluation.")):
        from opdlab.eval_cli import EvalOptions
    assert EvalOptions is importlib.import_module("opdlab.evaluation").EvalOptions
    for module, names in eval_cli.MOVED.items():
        for name in names:
            with pytest.warns(DeprecationWarning, match=rf"opdlab\.eval_cli\.{name} moved to opdlab\.evaluation\."):
                old = getattr(eval_cli, name)
            assert old is getattr(importlib.import_module(f"opdlab.evaluation.{module}"), name), name
    with pytest.raises(AttributeError, match="has no attribute 'eval_only'"):
        eval_cli.eval_only  # noqa: B018 - never a name of it


def test_a_name_that_was_never_public_still_raises_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        resolve("opdlab.models.no_such_name")


def test_docs_list_every_public_name_and_every_deprecated_path():
    api = (REPO_ROOT / "docs" / "api.md").read_text()
    changelog = (REPO_ROOT / "CHANGELOG.md").read_text()
    for module, names in PUBLIC.items():
        for name in names:
            assert name in api, f"docs/api.md does not mention {module}.{name}"
    for old in DEPRECATED:
        assert old in api, f"docs/api.md does not list the deprecated path {old}"
        assert old.rsplit(".", 1)[0] in changelog and old.rsplit(".", 1)[1] in changelog, old


# ------------------------------------------------------------------------------ versioning
def test_version_command_and_changelog_agree():
    from opdlab import __version__

    from conftest import run_opdlab

    assert __version__ == importlib.metadata.version("opdlab")
    result = run_opdlab(["--version"])
    assert result.code == 0 and result.out.strip() == f"opdlab {__version__}"
    latest = re.search(r"^## (\d+\.\d+\.\d+)", (REPO_ROOT / "CHANGELOG.md").read_text(), re.M)
    assert latest and latest.group(1) == __version__, "CHANGELOG.md's latest entry is not the package's version"
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert f'version = "{__version__}"' in pyproject, "reinstall (pip install -e .): the installed version is stale"


# ------------------------------------------------------------------------------ a plugin package written for 0.1.0
OLD_PLUGIN = REPO_ROOT / "tests" / "old_api_plugin"
OLD_DIST = "opdlab-old-api-plugin"


@pytest.fixture(scope="module")
def old_plugin_installed():
    """Install tests/old_api_plugin (editable, offline) into this environment; uninstall afterwards."""
    from test_plugins import _can_build_offline

    reason = _can_build_offline()
    if reason:
        pytest.fail(reason)  # setuptools>=70.1 is a dev dependency: this cannot be missing where the suite runs
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-e", str(OLD_PLUGIN)], check=True, capture_output=True, text=True)
    plugins.scan.cache_clear()
    yield OLD_DIST
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", OLD_DIST], check=False, capture_output=True)
    plugins.scan.cache_clear()
    for egg in OLD_PLUGIN.glob("*.egg-info"):
        import shutil

        shutil.rmtree(egg, ignore_errors=True)


def opdlab_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != plugins.DISABLE_ENV}
    return subprocess.run([sys.executable, "-m", "opdlab.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def test_a_plugin_written_for_0_1_0_loads_passes_the_contract_checks_and_trains(old_plugin_installed, tiny_checkpoints,
                                                                               tmp_path):
    listing = opdlab_process(["plugins"], tmp_path)
    assert listing.returncode == 0, listing.stdout + listing.stderr
    lines = [line.split()[:3] for line in listing.stdout.splitlines()]
    assert ["selectors", "old_low_confidence", OLD_DIST] in lines and ["divergences", "old_plain_kl", OLD_DIST] in lines
    assert "moved to opdlab.maths.log_softmax_fp32" in listing.stderr  # the author is told, once per old path

    code = ("from opdlab.testing import check_divergence, check_selector\n"
            "from opdlab_old_api_plugin import LowConfidenceSelector, PlainReverseKL\n"
            "check_selector(LowConfidenceSelector); check_divergence(PlainReverseKL); print('contract ok')")
    checked = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert checked.returncode == 0 and "contract ok" in checked.stdout, checked.stderr[-3000:]

    fit = opdlab_process([
        "fit", "--model.student", tiny_checkpoints.student, "--model.teacher", tiny_checkpoints.teacher,
        "--model.selector", "old_low_confidence", "--model.selector.ratio", "0.25", "--model.divergence", "old_plain_kl",
        "--model.rollout.max_new_tokens", "4", "--data.source", "opdlab.tasks.AdditionTask", "--data.source.digits", "2",
        "--data.source.num_eval", "8", "--data.batch_size", "8", "--data.val_batch_size", "8", "--trainer.max_steps",
        "1", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
    ], tmp_path)
    assert fit.returncode == 0, fit.stdout[-2000:] + fit.stderr[-3000:]
    assert "steps: 1" in fit.stdout
