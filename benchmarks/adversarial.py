"""An adversarial pass through the commands a user types: bad values, bad files, bad folders, as a careless or
hostile user would give them, each run as its own `opdlab ...` process and classified by what the user sees.

    python benchmarks/adversarial.py --output benchmarks/results/adversarial.md

Each case says what a serious tool should do (`refuse`: exit non-zero with one `...error: ...` line and no
traceback; `warn`: run, with a warning that says what to check; `run`: a valid input that must just work).
The outcome is one of: refused (one line), refused with a traceback, warned, ran silently, crashed
(a traceback and exit non-zero), timed out. The table lists every case with its expectation, outcome and the
first error or warning line; the summary counts outcomes and the cases whose outcome differs from the
expectation. Toy models (shipped or built once into the OPDLAB_CACHE this script sets) keep it on CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from report import publish

REPO = Path(__file__).resolve().parent.parent
FAST = str(REPO / "configs" / "fast.yaml")
DIAGNOSE = str(REPO / "configs" / "diagnose" / "add3.yaml")
SELECTORS = str(REPO / "configs" / "selectors")
SHORT = ["--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false"]


@dataclass
class Case:
    name: str
    args: list[str]
    expect: str  # refuse | warn | run
    files: dict[str, str | bytes] = field(default_factory=dict)  # written into the case's folder first
    env: dict[str, str] = field(default_factory=dict)


def jsonl(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


GOOD = [f'{{"prompt": "{i}+{i}=", "answer": "{2 * i}"}}' for i in range(40)]


def fit(*args: str) -> list[str]:
    return ["fit", "--config", FAST, *SHORT, *args]


def data(path: str, *args: str) -> list[str]:
    return ["--data.source", "opdlab.tasks.JsonlPrompts", "--data.source.init_args.train_path", path,
            "--data.source.init_args.num_eval", "8", *args]


def cases() -> list[Case]:
    c = []
    # --- selector options (class-typed: built by jsonargparse)
    for sel, key, value in [("teachability", "ratio", "0"), ("teachability", "ratio", "-0.1"), ("teachability", "ratio", "1.5"),
                            ("teachability", "ratio", "nan"), ("teachability", "ratio", "abc"), ("teachability", "top_k", "0"),
                            ("teachability", "top_k", "-3"), ("teachability", "top_k", "100"), ("random", "ratio", "2"),
                            ("entropy", "ratio", "0"), ("tip", "ratio", "-1"), ("teachability", "normalization", "zscore"),
                            ("divergence", "top_k", "0")]:
        c.append(Case(f"selector {sel} {key}={value}", fit("--model.selector", sel, f"--model.selector.init_args.{key}", value),
                      "refuse"))
    c.append(Case("selector name typo", fit("--model.selector", "teachabilty"), "refuse"))
    c.append(Case("selector class_path typo", fit("--model.selector.class_path", "opdlab.selectors.Teachabilty"), "refuse"))
    # --- divergence options
    for div, key, value in [("jsd", "beta", "1.5"), ("jsd", "beta", "-0.5"), ("reverse_kl", "temperature", "0"),
                            ("forward_kl", "temperature", "-1"), ("skew_kl", "alpha", "1.0"), ("tvd", "temperature", "0"),
                            ("sampled_token", "clip_low", "-0.2")]:
        c.append(Case(f"divergence {div} {key}={value}", fit("--model.divergence", div, f"--model.divergence.init_args.{key}", value),
                      "refuse"))
    c.append(Case("divergence name typo", fit("--model.divergence", "reversekl"), "refuse"))
    # --- option groups
    for key, value in [("rollout.num_samples", "0"), ("rollout.max_new_tokens", "0"), ("rollout.max_new_tokens", "100000"),
                       ("rollout.temperature", "0"), ("rollout.temperature", "-1"), ("rollout.temperature", "nan"),
                       ("rollout.temperature", "inf"), ("rollout.top_p", "0"), ("rollout.top_p", "1.5"), ("rollout.top_p", "nan"),
                       ("rollout.max_prompt_len", "0"), ("rollout.on_long_prompt", "drop"), ("memory.chunk_size", "0"),
                       ("memory.micro_batch_size", "0"), ("memory.student_dtype", "fp8"), ("memory.teacher_dtype", "int8"),
                       ("training.gradient_clip_val", "-1"), ("training.gradient_clip_val", "0"), ("training.gradient_clip_val", "nan"),
                       ("training.gradient_clip_val", "inf"), ("training.max_bad_steps", "-1"), ("training.loss_normalization", "mean"),
                       ("training.seed", "abc")]:
        c.append(Case(f"--model.{key} {value}", fit(f"--model.{key}", value), "refuse"))
    c.append(Case("negative learning rate", fit("--model.optimizer.init_args.lr", "-0.1"), "refuse"))
    c.append(Case("optimizer class typo", fit("--model.optimizer.class_path", "torch.optim.Adamw"), "refuse"))
    c.append(Case("unknown option", fit("--model.rollout.maximum_tokens", "8"), "refuse"))
    # argparse takes an unambiguous prefix of an option as that option (here max_new_tokens): it runs, as intended
    c.append(Case("option abbreviated", fit("--model.rollout.max_new_token", "8"), "run"))
    c.append(Case("unknown top-level key", fit("--modle.student", "x"), "refuse"))
    # --- models
    c.append(Case("student path missing", fit("--model.student", "./no/such/dir"), "refuse"))
    c.append(Case("student hub id unreachable", fit("--model.student", "nobody/no-such-model"), "refuse"))
    c.append(Case("toy role typo", fit("--model.student", "toy:add2/studnet"), "refuse"))
    c.append(Case("unknown toy", fit("--model.teacher", "toy:add9/teacher"), "refuse"))
    c.append(Case("student dir without tokenizer", fit("--model.student", "empty_model"), "refuse", files={"empty_model/config.json": "{}"}))
    c.append(Case("student and teacher tokenizers differ", fit("--model.teacher", "toy:spell2/teacher"), "refuse"))
    # --- engines
    for key, value in [("stop_check_interval", "0"), ("min_prompt_bucket", "0"), ("dtype", "fp8"), ("max_workspaces", "0")]:
        c.append(Case(f"static engine {key}={value}", fit("--model.rollout_engine", "static",
                                                            f"--model.rollout_engine.init_args.{key}", value), "refuse"))
    for key, value in [("gpu_memory_utilization", "1.5"), ("gpu_memory_utilization", "0"), ("sleep_level", "3"), ("kv_cache_gb", "-1")]:
        c.append(Case(f"vllm engine {key}={value}", fit("--model.rollout_engine", "vllm",
                                                          f"--model.rollout_engine.init_args.{key}", value), "refuse"))
    c.append(Case("engine name typo", fit("--model.rollout_engine", "statc"), "refuse"))
    # --- a teacher on a server (issue 27): URLs, placement options, needs (no server is started: the checks run first)
    served = ["--model.divergence", "sampled_token"]
    for label, url in [("nothing listening", "http://127.0.0.1:9/v1"), ("no host", "http://"),
                       ("bad port", "http://127.0.0.1:99999/v1"), ("one of two bad", "http://127.0.0.1:9/v1,http://"),
                       ("only commas", "http://127.0.0.1:9/v1,,"), ("https nothing listening", "https://127.0.0.1:9/v1"),
                       ("ftp scheme", "ftp://127.0.0.1/v1")]:
        c.append(Case(f"teacher URL {label}", fit("--model.teacher", url, *served), "refuse"))
    for key, value in [("top_logprobs", "0"), ("top_logprobs", "-3"), ("top_logprobs", "all"), ("max_concurrency", "0"),
                       ("timeout_s", "0"), ("timeout_s", "nan"), ("max_retries", "-1"), ("rows_per_request", "0"),
                       ("retry_backoff_s", "-1")]:
        c.append(Case(f"served teacher {key}={value}", fit("--model.teacher", "http://127.0.0.1:9/v1", *served,
                                                           f"--model.teacher_placement.{key}", value), "refuse"))
    c.append(Case("served teacher with reverse KL (needs the whole distribution)",
                  fit("--model.teacher", "http://127.0.0.1:9/v1"), "refuse"))
    c.append(Case("served teacher with full-vocabulary divergence selection",
                  fit("--model.teacher", "http://127.0.0.1:9/v1", *served, "--model.selector", "divergence",
                      "--model.selector.init_args.full_vocab", "true"), "refuse"))
    c.append(Case("teacher placement local with a URL", fit("--model.teacher", "http://127.0.0.1:9/v1", *served,
                                                    "--model.teacher_placement", "local"), "refuse"))
    c.append(Case("teacher placement vllm_server with a path", fit("--model.teacher_placement", "vllm_server", *served), "refuse"))
    c.append(Case("teacher placement name typo", fit("--model.teacher_placement", "vllm_sever"), "refuse"))
    # --- data: JSONL files
    c.append(Case("jsonl missing file", fit(*data("nope.jsonl")), "refuse"))
    c.append(Case("jsonl is a directory", fit(*data("adir")), "refuse", files={"adir/x.txt": ""}))
    c.append(Case("jsonl empty file", fit(*data("e.jsonl")), "refuse", files={"e.jsonl": ""}))
    c.append(Case("jsonl blank lines only", fit(*data("b.jsonl")), "refuse", files={"b.jsonl": "\n\n  \n"}))
    c.append(Case("jsonl not UTF-8", fit(*data("u.jsonl")), "refuse", files={"u.jsonl": b'{"prompt": "\xff", "answer": "1"}\n'}))
    c.append(Case("jsonl byte-order mark", fit(*data("bom.jsonl")), "run", files={"bom.jsonl": "\ufeff" + jsonl(GOOD)}))
    c.append(Case("jsonl malformed line", fit(*data("m.jsonl")), "refuse", files={"m.jsonl": jsonl(GOOD[:5] + ["{oops"] + GOOD[5:])}))
    c.append(Case("jsonl a JSON array", fit(*data("a.jsonl")), "refuse", files={"a.jsonl": "[" + ",".join(GOOD) + "]\n"}))
    for label, answer in [("missing", None), ("list", "[\"1\"]"), ("dict", "{\"a\": 1}"), ("bool", "true"), ("null", "null")]:
        line = '{"prompt": "1+1="}' if answer is None else f'{{"prompt": "1+1=", "answer": {answer}}}'
        c.append(Case(f"jsonl answer {label}", fit(*data("q.jsonl")), "refuse", files={"q.jsonl": jsonl(GOOD + [line])}))
    c.append(Case("jsonl prompt not a string", fit(*data("p.jsonl")), "refuse", files={"p.jsonl": jsonl(GOOD + ['{"prompt": 5, "answer": "1"}'])}))
    c.append(Case("jsonl empty prompt", fit(*data("ep.jsonl")), "refuse", files={"ep.jsonl": jsonl(GOOD + ['{"prompt": "", "answer": "1"}'])}))
    c.append(Case("jsonl num_eval >= lines", fit(*data("few.jsonl", "--data.source.init_args.num_eval", "50")), "refuse",
                  files={"few.jsonl": jsonl(GOOD[:10])}))
    c.append(Case("jsonl one line", fit(*data("one.jsonl")), "refuse", files={"one.jsonl": jsonl(GOOD[:1])}))
    c.append(Case("jsonl DAPO without ground_truth", fit(*data("d.jsonl")), "refuse",
                  files={"d.jsonl": jsonl(GOOD + ['{"prompt": [{"role": "user", "content": "1+1="}], "reward_model": {}}'])}))
    c.append(Case("jsonl eval overlaps train", fit(*data("t.jsonl", "--data.source.init_args.eval_path", "v.jsonl")), "warn",
                  files={"t.jsonl": jsonl(GOOD), "v.jsonl": jsonl(GOOD[:8])}))
    c.append(Case("jsonl unknown verifier", fit(*data("g.jsonl", "--data.source.init_args.verifier", "fuzzy")), "refuse",
                  files={"g.jsonl": jsonl(GOOD)}))
    c.append(Case("jsonl good file", fit(*data("g.jsonl")), "run", files={"g.jsonl": jsonl(GOOD)}))
    c.append(Case("data batch_size 0", fit("--data.batch_size", "0"), "refuse"))
    c.append(Case("data val_batch_size -1", fit("--data.val_batch_size", "-1"), "refuse"))
    c.append(Case("task digits 0", fit("--data.source.init_args.digits", "0"), "refuse"))
    c.append(Case("task num_eval 0", fit("--data.source.init_args.num_eval", "0"), "refuse"))
    # --- folders, checkpoints, resume
    c.append(Case("save_dir under a file", fit("--trainer.logger.init_args.save_dir", "afile/runs"), "refuse", files={"afile": ""}))
    c.append(Case("OPDLAB_CACHE under a file", fit("--model.student", "toy:add2/student", "--model.teacher", "toy:add2/teacher"), "refuse",
                  files={"cfile": ""}, env={"OPDLAB_CACHE": "cfile/cache"}))
    c.append(Case("resume with nothing to resume", fit("--resume"), "refuse"))
    c.append(Case("ckpt_path missing", fit("--ckpt_path", "none.ckpt"), "refuse"))
    c.append(Case("ckpt_path garbage file", fit("--ckpt_path", "g.ckpt"), "refuse", files={"g.ckpt": "not a checkpoint"}))
    c.append(Case("ckpt_path empty file", fit("--ckpt_path", "z.ckpt"), "refuse", files={"z.ckpt": ""}))
    c.append(Case("resume and ckpt_path together", fit("--resume", "--ckpt_path", "g.ckpt"), "refuse", files={"g.ckpt": "x"}))
    c.append(Case("config file missing", ["fit", "--config", "none.yaml"], "refuse"))
    c.append(Case("config file not YAML", ["fit", "--config", "bad.yaml"], "refuse", files={"bad.yaml": "model: [unclosed\n"}))
    c.append(Case("config with unknown key", ["fit", "--config", FAST, "--config", "k.yaml", *SHORT], "refuse",
                  files={"k.yaml": "model:\n  studnet: x\n"}))
    c.append(Case("trainer max_steps -5", fit("--trainer.max_steps", "-5"), "refuse"))
    c.append(Case("trainer accelerator gpu on CPU", fit("--trainer.accelerator", "gpu"), "refuse"))
    c.append(Case("trainer devices 0", fit("--trainer.devices", "0"), "refuse"))
    c.append(Case("trainer precision bogus", fit("--trainer.precision", "13"), "refuse"))
    c.append(Case("val_check_interval 0", fit("--trainer.val_check_interval", "0"), "refuse"))
    c.append(Case("fit a valid short run", fit(), "run"))
    # --- validate / test
    c.append(Case("validate a valid config", ["validate", "--config", FAST], "run"))
    c.append(Case("test without a test split", ["test", "--config", FAST, *data("g.jsonl")], "refuse", files={"g.jsonl": jsonl(GOOD)}))
    c.append(Case("validate ckpt_path missing", ["validate", "--config", FAST, "--ckpt_path", "none.ckpt"], "refuse"))
    # --- compare
    cmp = ["compare", "--seeds", "[0]", "--steps", "1", "--overlays_dir", SELECTORS, "--fit_config", f"[{FAST}]"]
    c.append(Case("compare selector typo", [*cmp, "--selectors", "[full,teachabilty]"], "refuse"))
    c.append(Case("compare ratio 1.5", [*cmp, "--ratio", "1.5"], "refuse"))
    c.append(Case("compare ratio 0", [*cmp, "--ratio", "0"], "refuse"))
    c.append(Case("compare steps 0", [*cmp, "--steps", "0"], "refuse"))
    c.append(Case("compare jobs 0", [*cmp, "--jobs", "0"], "refuse"))
    c.append(Case("compare no seeds", [*cmp, "--seeds", "[]"], "refuse"))
    c.append(Case("compare out_dir under a file", [*cmp, "--selectors", "[full]", "--out_dir", "afile/out"], "refuse", files={"afile": ""}))
    c.append(Case("compare sweep ratio 2", [*cmp, "--selectors", "[full]", "--sweep_selector", "random", "--sweep_ratios", "[0.1,2]"], "refuse"))
    c.append(Case("compare fit_config missing", ["compare", "--seeds", "[0]", "--fit_config", "[none.yaml]", "--selectors", "[full]"], "refuse"))
    c.append(Case("compare unknown option", [*cmp, "--selector", "[full]"], "refuse"))
    # --- diagnose
    dia = ["diagnose", "--config", DIAGNOSE]
    for key, value in [("bank.top_k", "100"), ("bank.top_k", "0"), ("bank.contexts", "0"), ("bank.max_response_tokens", "0"),
                       ("bank.batch_size", "0"), ("train.steps", "-1"), ("train.lr", "-1"), ("stats.bootstrap", "0")]:
        c.append(Case(f"diagnose --{key} {value}", [*dia, f"--{key}", value, "--out_dir", "d"], "refuse"))
    c.append(Case("diagnose out_dir under a file", [*dia, "--out_dir", "afile/d"], "refuse", files={"afile": ""}))
    c.append(Case("diagnose bank path missing", [*dia, "--bank.path", "none.pt", "--out_dir", "d"], "refuse"))
    c.append(Case("diagnose student_after missing", [*dia, "--student_after", "none", "--out_dir", "d"], "refuse"))
    # --- toy and plugins
    c.append(Case("toy unknown name", ["toy", "--name", "add9"], "refuse"))
    c.append(Case("toy seed abc", ["toy", "--seed", "abc"], "refuse"))
    c.append(Case("plugins listing", ["plugins"], "run"))
    c.append(Case("unknown command", ["fitt"], "refuse"))
    c.append(Case("no command", [], "run"))
    return c


def classify(rc: int | None, out: str) -> tuple[str, str]:
    """(outcome, the line a user reads first about it)."""
    lines = [line for line in out.splitlines() if line.strip()]
    error = next((line for line in lines if re.search(r"(^|: )error: ", line)), "")
    warning = next((line for line in lines if "Warning:" in line or "warn" in line.lower()), "")
    if rc is None:
        return "timed out", ""
    if rc != 0:
        if "Traceback" in out:
            return ("refused, with a traceback" if error else "crashed (traceback)"), error or lines[-1] if lines else ""
        return "refused (one line)", error or (lines[-1] if lines else "")
    return ("warned", warning) if warning else ("ran silently", "")


def run_case(case: Case, root: Path, timeout: int, env: dict) -> dict:
    folder = Path(tempfile.mkdtemp(dir=root))
    for name, content in case.files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "opdlab.cli", *case.args], cwd=folder, capture_output=True, text=True,
                              timeout=timeout, env={**env, **case.env}, errors="replace")
        rc, out = proc.returncode, proc.stdout + "\n" + proc.stderr
    except subprocess.TimeoutExpired:
        rc, out = None, ""
    outcome, line = classify(rc, out)
    expected = {"refuse": "refused (one line)", "warn": "warned", "run": ("ran silently", "warned")}[case.expect]
    ok = outcome in expected if isinstance(expected, tuple) else outcome == expected
    return {"case": case.name, "expect": case.expect, "outcome": outcome, "ok": ok, "line": line[:160],
            "seconds": time.perf_counter() - started}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--timeout", type=int, default=180, help="seconds per case")
    p.add_argument("--only", help="run the cases whose name contains this")
    p.add_argument("--output", help="append the markdown result here")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="opdlab_adversarial_"))
    env = {**os.environ, "OPDLAB_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    selected = [c for c in cases() if not args.only or args.only in c.name]
    rows = []
    for i, case in enumerate(selected, 1):
        row = run_case(case, root, args.timeout, env)
        rows.append(row)
        print(f"[{i}/{len(selected)}] {'ok ' if row['ok'] else 'BAD'} {case.name}: {row['outcome']} ({row['seconds']:.0f} s) "
              f"{row['line'][:100]}", flush=True)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["outcome"]] = counts.get(row["outcome"], 0) + 1
    bad = [r for r in rows if not r["ok"]]
    lines = ["| outcome | cases |", "|---|---|", *(f"| {k} | {v} |" for k, v in sorted(counts.items())),
             "", f"{len(rows) - len(bad)} of {len(rows)} cases behave as expected; {len(bad)} do not:", "",
             "| case | expected | outcome | first line |", "|---|---|---|---|",
             *(f"| {r['case']} | {r['expect']} | {r['outcome']} | {r['line'].replace('|', '/')} |" for r in bad),
             "", "<details><summary>every case</summary>", "", "| case | expected | outcome | first line |", "|---|---|---|---|",
             *(f"| {r['case']} | {r['expect']} | {r['outcome']} | {r['line'].replace('|', '/')} |" for r in rows),
             "", "</details>"]
    publish("adversarial", f"{platform.node()}, {os.cpu_count()} CPU threads, Python {platform.python_version()}.",
            "Each case is `python -m opdlab.cli <args>` in its own folder (OMP_NUM_THREADS=1, a fresh OPDLAB_CACHE for "
            "the run); refused = exit non-zero with one error line and no traceback.\n", "\n".join(lines), args.output)


if __name__ == "__main__":
    main()
