"""benchmarks/gpu_acceptance.py (issue 31) in its CPU dry mode, end to end, so the script a GPU machine will run
cannot rot between the rare sessions that have one; and its failure reporting and refusals."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_acceptance.py"
PARITY = REPO_ROOT / "benchmarks" / "placement_parity.py"
SECTIONS = ["## Machine and versions", "## Stages", "## Install", "## Main job", "## Qwen3-shaped fits", "## Targets",
            "## Teacher placements (benchmarks/placement_parity.py)",
            "## Asynchronous pipeline (benchmarks/async_throughput.py)", "## Rollout engines (benchmarks/rollout.py)",
            "## Loss path (benchmarks/loss_memory.py)", "## Commands"]
NUMBER = r"\d+\.\d+"


def load():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def stage_rows(report: str) -> dict[str, tuple[str, str]]:
    table = report.split("## Stages", 1)[1].split("## Install", 1)[0]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    return {row[0][2:]: (row[1], row[3].rstrip(" |")) for row in rows[1:]}


def section(report: str, title: str) -> str:
    return report.split(title, 1)[1].split("\n## ", 1)[0]


def test_dry_run_writes_every_section_with_numbers(tmp_path):
    """The real script path at tiny shapes on the CPU: every stage runs in its subprocess and the report has
    each section with numbers in it. vllm's fit is SKIPPED with its reason where vllm is not installed."""
    vllm = importlib.util.find_spec("vllm") is not None
    out = tmp_path / "gpu.md"
    proc = run("--device", "cpu", "--quick", "--output", str(out), "--workdir", str(tmp_path / "work"),
               "--fits", "ta_opd:static", *([] if vllm else ["ta_opd:vllm"]))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    assert "**CPU dry run, not a GPU result**" in report
    assert [s for s in SECTIONS if s not in report] == []
    stages = stage_rows(report)
    for name in ("env", "install", "main-job", "placements", "models", "fit ta_opd static", "async", "rollout",
                 "loss"):
        assert stages[name][0] == "PASSED", (name, stages[name])
    if not vllm:
        assert stages["fit ta_opd vllm"][0] == "SKIPPED" and "vllm is not installed" in stages["fit ta_opd vllm"][1]
    assert re.search(r"student \d+\.\d% -> \d+\.\d%", stages["main-job"][1])
    fits = section(report, "## Qwen3-shaped fits")
    static = next(line for line in fits.splitlines() if line.startswith("| ta_opd | static |"))
    cells = static.split(" | ")
    assert re.fullmatch(r"16 x \d+", cells[2]) and all(re.fullmatch(NUMBER, c) for c in cells[3:11]), static
    assert "rss" in cells[12]
    placements = section(report, "## Teacher placements (benchmarks/placement_parity.py)")
    assert re.findall(r"^\| static \| (full|lora) \| (reverse_kl|sampled_token) \| .* \| PASSED \|$", placements,
                      re.M) == [("full", "reverse_kl"), ("full", "sampled_token"), ("lora", "reverse_kl"),
                                ("lora", "sampled_token")], placements
    assert re.search(r"4 of 4 pairs equal within 0.0001 x max\(1, abs\(local\)\); largest abs diff \d",
                     stages["placements"][1]), stages["placements"]
    pipeline = section(report, "## Asynchronous pipeline (benchmarks/async_throughput.py)")
    assert [line.split(" | ")[0] for line in pipeline.splitlines() if re.match(r"\| \d \|", line)] == \
        ["| 0", "| 1", "| 2"], pipeline
    assert "Overlap ceiling with one producer" in pipeline, pipeline
    for title in ("## Rollout engines (benchmarks/rollout.py)", "## Loss path (benchmarks/loss_memory.py)"):
        body = [line for line in section(report, title).splitlines() if line.startswith("| ") and "---" not in line]
        assert len(body) >= 2 and re.search(NUMBER, body[-1]), (title, body)
    targets = section(report, "## Targets")
    assert len(re.findall(r"^\| (main job's gate|vllm <=|full OPD step|weight sync)", targets, re.M)) == 4, targets
    assert "| met |" not in targets and "SHORT" not in targets  # a CPU's numbers are no verdict
    assert "opdlab.cli fit --config" in section(report, "## Commands")
    assert re.search(r"\[\d+\] main-job: PASSED in", proc.stdout)  # progress per stage


def test_a_served_teacher_gives_the_local_teachers_first_step_loss(tmp_path):
    """benchmarks/placement_parity.py (issue 36) on the CPU: one step of a full and a LoRA student per divergence,
    local teacher against the same teacher behind the fake vLLM server, the same loss; the vllm engine's pairs
    SKIPPED with the reason where vllm is not installed. (On a GPU the acceptance stage `placements` runs it with
    --device cuda: the served rows parsed on the CPU must reach the student's device.)"""
    vllm = importlib.util.find_spec("vllm") is not None
    out = tmp_path / "parity.json"
    proc = subprocess.run([sys.executable, str(PARITY), "--device", "cpu", "--engines",
                           "static" if vllm else "static,vllm", "--out", str(out)],
                          capture_output=True, text=True, timeout=170, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| engine | student | divergence | local loss | served loss | abs diff | status |" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("placement_parity: PASSED in ")
    result = json.loads(out.read_text())
    ran = [row for row in result["rows"] if row["engine"] == "static"]
    assert [(row["student"], row["divergence"], row["status"]) for row in ran] == [
        ("full", "reverse_kl", "PASSED"), ("full", "sampled_token", "PASSED"), ("lora", "reverse_kl", "PASSED"),
        ("lora", "sampled_token", "PASSED")]
    for row in ran:  # the served step asked the server; its loss is the local one; a real loss, not a near-zero one
        assert row["requests"] > 0 and row["diff"] <= 1e-4 * max(1.0, abs(row["local"])) and row["local"] > 0.5, row
        assert row["student_device"] == row["rollout_device"] == "cpu" and row["rollout"] == "same", row
    assert result["max_diff"] == max(row["diff"] for row in ran) and result["table"][0].startswith("| engine |")
    if not vllm:
        assert [row["status"] + ": " + row["reason"] for row in result["rows"] if row["engine"] == "vllm"] == \
            ["SKIPPED: vllm is not installed"] * 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: --device cuda would run")
def test_a_failing_placements_stage_keeps_its_reason(tmp_path):
    """--device cuda without a GPU: the script refuses in one line and the stage is FAILED with that line."""
    out = tmp_path / "gpu.md"
    proc = run("--device", "cuda", "--install", "skip", "--stages", "placements", "--output", str(out),
               "--workdir", str(tmp_path / "work"), timeout=90)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = stage_rows(out.read_text())
    assert stages["placements"][0] == "FAILED"
    assert "--device cuda: torch sees no CUDA device" in stages["placements"][1], stages["placements"]


def test_a_failing_stage_is_reported_with_its_reason_and_the_next_stage_runs(tmp_path):
    out, empty = tmp_path / "gpu.md", tmp_path / "wheels"
    empty.mkdir()
    proc = run("--device", "cpu", "--quick", "--output", str(out), "--workdir", str(tmp_path / "work"),
               "--stages", "install", "rollout", "--require", "opdlab-no-such-package", "--wheelhouse", str(empty))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "install: FAILED" in proc.stdout and "FAILED (install)" in proc.stdout.splitlines()[-1]
    report = out.read_text()
    stages = stage_rows(report)
    assert stages["install"][0] == "FAILED"
    assert f"missing here and not in the wheelhouse {empty}: opdlab-no-such-package" in stages["install"][1]
    assert stages["rollout"][0] == "PASSED"
    assert "Result: FAILED (install)" in report


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--device", "cuda", "--wheelhouse", "/nonexistent/wheels"], "--wheelhouse /nonexistent/wheels is not a folder"),
    (["--device", "cpu", "--output", "/proc/gpu.md"], "--output /proc/gpu.md cannot be written"),
    (["--device", "cpu", "--fits", "ta_opd:trl"], "--fits ta_opd:trl: expected CONFIG:ENGINE"),
    (["--device", "cpu", "--rows", "12"], "--rows 12 must be a multiple of 8"),
    (["--device", "cpu", "--budget-s", "0"], "--budget-s 0 must be positive"),
    (["--device", "cpu", "--steps", "0"], "--steps 0 must be at least 1"),
    (["--device", "cpu", "stray"], "unexpected arguments: stray"),
    (["--device", "cpu", "--output", "."], "--output . cannot be written: Is a directory"),
])
def test_bad_options_are_refused_in_one_line(args, message, tmp_path):
    proc = run(*args, "--workdir", str(tmp_path), timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_gate_error_line_and_missing_requirements():
    ga = load()
    summary = {"steps": 200, "accuracy_before": 0.402, "accuracy_after": 0.883, "teacher_accuracy": 0.996}
    assert ga.check_gate(summary, (70.0, 92.0), quick=False)[0]
    assert not ga.check_gate({**summary, "accuracy_after": 0.5}, (70.0, 92.0), quick=False)[0]
    assert not ga.check_gate({"steps": 3}, (70.0, 92.0), quick=True)[0]  # no accuracy: never a pass
    assert ga.readme_band()[0] < ga.readme_band()[1]
    log = "Traceback (most recent call last):\n  x\nValueError: bad shape\nerror: metadata-generation-failed\n"
    assert ga.last_error_line(log) == "ValueError: bad shape"
    assert ga.last_error_line("one\ntwo\n") == "two"
    assert ga.requirement_gaps(["torch>=2.0", "opdlab-no-such-package"]) == ["opdlab-no-such-package"]
    assert ga.requirement_gaps(["torch<1"])[0].startswith("torch<1 (installed ")
    assert ga.normalized("Math_Verify>=0.7") == "math-verify"


def test_relative_paths_hold_although_stages_run_in_the_work_folder(tmp_path):
    """The stages run in the work folder, so a relative --wheelhouse is resolved first (a carried `wheelhouse`
    given as such was once looked for inside the work folder)."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--list-missing", "--require", "opdlab-no-such-package",
                           "--wheelhouse", "wh"], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.strip() == f"gpu_acceptance: missing: opdlab-no-such-package (not in {tmp_path / 'wh'})"


def test_the_time_budget_stops_a_stage_and_skips_the_rest(tmp_path):
    """A stage still running when the budget runs out is FAILED for that reason and the stages after it are SKIPPED.
    The running stage is a command that outlasts any budget (not the quick main job, which a fast machine finishes
    within a few seconds), so the test does not depend on the machine's speed."""
    module = load()
    (tmp_path / "work").mkdir()
    runner = module.Runner(argparse.Namespace(budget_s=6.0, quick=True, workdir=tmp_path / "work"))
    stage = runner.begin("main-job")
    assert stage is not None
    ok, err = runner.run(stage, [sys.executable, "-c", "import time; time.sleep(120)"], timeout=120)
    assert not ok and "the time budget (--budget-s) ran out" in err, err
    runner.end(stage, "FAILED", err)
    assert runner.begin("loss") is None
    assert [(s.name, s.status) for s in runner.stages] == [("main-job", "FAILED"), ("loss", "SKIPPED")]
    assert runner.stages[1].reason == "the time budget (--budget-s 6) is spent"
    assert module.verdict(runner.stages) == "FAILED (main-job); not run for want of time: loss"
    out = tmp_path / "gpu.md"
    # every stage left out by the budget: no stage failed, but nothing was proved
    proc = run("--device", "cpu", "--quick", "--stages", "loss", "--budget-s", "1", "--output", str(out),
               "--workdir", str(tmp_path / "work"), timeout=60)
    assert proc.returncode == 1 and "INCOMPLETE (not run for want of time: env, loss)" in proc.stdout, proc.stdout
