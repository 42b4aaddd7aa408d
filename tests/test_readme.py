"""The README's two commands are the contract: CI runs exactly the test command, and the quick-start
command names things that exist."""

from __future__ import annotations

import re

from conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
COMMANDS = re.findall(r"```bash\n(python3 -m venv[^\n]*)\n```", README)


def test_readme_has_the_run_and_test_commands():
    assert len(COMMANDS) == 2, COMMANDS
    run, test = COMMANDS
    assert "opdlab fit --config configs/ta_opd.yaml" in run
    assert test.rstrip().endswith("pytest")


def test_ci_runs_the_readme_test_command():
    ci = (REPO_ROOT / ".ci/run").read_text().splitlines()
    assert COMMANDS[1] in ci, "the .ci/run command and the README's test command have drifted apart"


def test_quick_start_files_exist():
    for path in re.findall(r"(configs/[\w./-]+\.yaml)", README):
        assert (REPO_ROOT / path).exists(), path


def test_floors_match_the_declared_minimums():
    """.ci/floors.txt pins exactly the lower bounds pyproject.toml declares (CI tests at those versions)."""
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    floors = dict(line.split("==") for line in (REPO_ROOT / ".ci/floors.txt").read_text().splitlines()
                  if line and not line.startswith("#"))
    assert set(floors) == {"transformers", "lightning", "jsonargparse", "torchmetrics", "datasets", "peft"}
    for name, version in floors.items():
        assert re.search(rf'"{name}(\[\w+\])?>={re.escape(version.removesuffix(".0"))}(\.0)?"', pyproject), name
    assert ".venv-floors/bin/pytest" in (REPO_ROOT / ".ci/run").read_text()


def test_docs_sections_cited_in_the_repository_exist():
    """Code and docs cite `docs/method.md §N`; every cited section is there, and nothing points at a design
    file outside the repository."""
    import subprocess

    method = (REPO_ROOT / "docs" / "method.md").read_text()
    sections = set(re.findall(r"^##+ §([\d.]+)", method, flags=re.M))
    text = subprocess.run(["git", "grep", "-h", "docs/method.md §"], cwd=REPO_ROOT, capture_output=True, text=True).stdout
    cited = set(re.findall(r"docs/method\.md §([\d.]+\d)", text))
    assert cited and cited <= sections, sorted(cited - sections)
    mentions = subprocess.run(["git", "grep", "-l", "DESIGN" + ".md"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert mentions.stdout.split() == [], mentions.stdout


def test_ci_sets_up_vllm_as_the_readme_says():
    """The vLLM-on-CPU setup line in the README is the one .ci/run uses for its vllm environment."""
    setup = re.search(r"```sh\n(python3 -m venv \.venv-vllm[^\n]*)\n", README).group(1)
    assert setup in (REPO_ROOT / ".ci/run").read_text().splitlines()
    assert ".venv-vllm/bin/pytest -m vllm" in (REPO_ROOT / ".ci/run").read_text()


def test_readme_stays_a_five_minute_read_and_its_links_exist():
    """About 1,200 words (results and their history live in docs/results.md), and every file it links is there."""
    assert len(README.split()) <= 1250, f"README.md has {len(README.split())} words; move details to docs/"
    for link in re.findall(r"\]\(([^)#]+)\)", README):
        assert (REPO_ROOT / link).exists(), link
