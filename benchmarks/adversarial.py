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
from dataclasses import dataclass, field, replace
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
    issue: int = 0  # the issue that added the case (0: before issue 28); `--issue N` runs those only
    program: list[str] | None = None  # the command before `args` (default: the opdlab command)
    says: str = ""  # where set, the line the user reads must contain it (the option named whole, say)


def jsonl(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


GOOD = [f'{{"prompt": "{i}+{i}=", "answer": "{2 * i}"}}' for i in range(40)]


def fit(*args: str) -> list[str]:
    return ["fit", "--config", FAST, *SHORT, *args]


def data(path: str, *args: str) -> list[str]:
    return ["--data.source", "opdlab.tasks.JsonlPrompts", "--data.source.init_args.train_path", path,
            "--data.source.init_args.num_eval", "8", *args]


EVAL_TOY = str(REPO / "configs" / "eval" / "toy.yaml")
REC = ('{"seed": 0, "benchmark": "add3", "index": 0, "sample": 0, "prompt": "x", "answer": "1", "response": "1", '
       '"correct": true, "key": "1", "length": 2, "truncated": false}\n')


def ev(*args: str) -> list[str]:
    return ["eval", "--config", EVAL_TOY, "--k", "2", "--benchmarks.limit", "4", *args]


def parquet_bytes(rows: dict[str, list]) -> bytes:
    """A parquet file's bytes; an empty or string column is typed string (an empty file keeps its schema)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({k: pa.array(v, pa.string()) if not v or isinstance(v[0], str) else pa.array(v)
                             for k, v in rows.items()}), buf)
    return buf.getvalue()


ROWS = {"prompt": [f"{i}+{i}=" for i in range(40)], "answer": [f"{2 * i:03d}" for i in range(40)]}
CSV = "prompt,answer\n" + "".join(f"{p},{a}\n" for p, a in zip(ROWS["prompt"], ROWS["answer"], strict=True))


def dsdata(path: str, *args: str) -> list[str]:
    return ["--data.source", "opdlab.tasks.DatasetPrompts", "--data.source.init_args.path", path,
            "--data.source.init_args.num_eval", "8", *args]


def cases() -> list[Case]:
    return [*cases_before_28(),
            *(replace(case, issue=28) for case in [*cases_28(), *cases_28_retest(), *cases_28_parser()]),
            *(replace(case, issue=30) for case in cases_30()), *(replace(case, issue=31) for case in cases_31()),
            *(replace(case, issue=36) for case in [*cases_36(), *cases_36_placements()]),
            *(replace(case, issue=37) for case in [*cases_37(), *cases_37_fleet(), *cases_37_servers()])]


PIPELINE_BAD = {  # issue 37: each pipeline option's class of bad values, as typed on the command line
    "max_staleness": ["-1", "1.5", "many", "true"],
    "producer": ["threads", "PROCESS", "''"],
    "producer_threads": ["0", "-2", "1.5", "all"],
    "producer_device": ["gpu0", "cuda:7", "meta"],
    "timeout": ["0", "-1", "nan", "inf", "soon"],
    "urls": ["[127.0.0.1:9/v1]", "[http://127.0.0.1:9/v1]"],  # not a URL; a URL without the fleet producer
}


def cases_37_fleet() -> list[Case]:
    """Issue 37: the vllm_fleet producer's URLs, as a class (no server needed)."""
    fleet = ["--model.pipeline.producer", "vllm_fleet"]
    down = "[http://127.0.0.1:9/v1]"
    return [
        Case("fit fleet with an empty url list", fit(*fleet, "--model.pipeline.urls", "[]"), "refuse",
             says="needs pipeline.urls"),
        Case("fit fleet url a bare string", fit(*fleet, "--model.pipeline.urls", "http://127.0.0.1:9/v1"), "refuse",
             says="--model.pipeline.urls"),
        Case("fit fleet url bad port", fit(*fleet, "--model.pipeline.urls", "[http://127.0.0.1:99999/v1]"), "refuse",
             says="pipeline.urls: bad port"),
        Case("fit fleet url without host", fit(*fleet, "--model.pipeline.urls", "[http://]"), "refuse",
             says="pipeline.urls"),
        Case("fit fleet url twice", fit(*fleet, "--model.pipeline.urls", "[http://127.0.0.1:9/v1, http://127.0.0.1:9/v1]"),
             "refuse", says="lists a server twice"),
        Case("fit fleet https, nothing listening", fit(*fleet, "--model.pipeline.urls", "[https://127.0.0.1:9/v1]"),
             "refuse", says="https://127.0.0.1:9/v1"),
        Case("fit fleet, one of two servers down", fit(*fleet, "--model.pipeline.urls",
                                                       "[http://127.0.0.1:9/v1, http://127.0.0.1:10/v1]"), "refuse",
             says="http://127.0.0.1:9/v1"),
        Case("fit fleet negative staleness", fit(*fleet, "--model.pipeline.urls", down,
                                                 "--model.pipeline.max_staleness", "-1"), "refuse",
             says="max_staleness must be an integer >= 0"),
    ]


def served(faults: str, *args: str, mode: str = "processed", urls: str = "$U") -> list[str]:
    """A bash script: the suite's stand-in for a vLLM server of the student (tests/fake_rollout_server.py) with
    `faults`, then `opdlab fit` at max_staleness 1 on it; the server is stopped whatever happens."""
    fake = f"{sys.executable} {REPO / 'tests' / 'fake_rollout_server.py'} toy:add2/student"
    fit_cmd = " ".join([sys.executable, "-m", "opdlab.cli", *fit("--trainer.max_steps", "3",
                        "--model.pipeline.producer", "vllm_fleet", "--model.pipeline.max_staleness", "1", *args)])
    return [f"{fake} --faults '{faults}' --logprobs-mode {mode} --url-file u.txt >/dev/null 2>&1 & P=$!; "
            "for i in $(seq 300); do [ -s u.txt ] && break; sleep 0.2; done; U=$(cat u.txt); "
            f"{fit_cmd} --model.pipeline.urls \"[{urls}]\"; R=$?; kill $P; exit $R"]


def cases_37_servers() -> list[Case]:
    """Issue 37: what a rollout server may do wrong, each through `opdlab fit` against the suite's stand-in with that
    fault (tests/fake_rollout_server.py documents them): late, another policy version, a sync failing halfway or
    doing nothing, answers out of the wire format, the wrong log-probs mode, no dev endpoints, a dead fleet member."""
    bash = ["bash", "-c"]
    return [
        Case("fleet server healthy", served("{}"), "run", program=bash),
        Case("fleet server slower than the timeout", served('{"delay_s": 30}', "--model.pipeline.timeout", "3"),
             "refuse", program=bash, says="127.0.0.1"),
        Case("fleet server answering for another policy version", served('{"relabel_after": 2}'), "refuse",
             program=bash, says="127.0.0.1"),
        Case("fleet sync failing halfway", served('{"reload_fail_from": 2}'), "refuse", program=bash, says="127.0.0.1"),
        Case("fleet sync that keeps the old weights (lr 0.05: the policies part within a step)",
             served('{"reload_noop": true}', "--model.optimizer.init_args.lr", "0.05"), "refuse", program=bash,
             says="does not sample with the student's weights"),
        Case("fleet answer with a token id past the vocabulary", served('{"token_id": 99999}'), "refuse", program=bash,
             says="127.0.0.1"),
        Case("fleet answer with a NaN log-prob", served('{"logprob": NaN}'), "refuse", program=bash, says="127.0.0.1"),
        Case("fleet answer with a positive log-prob", served('{"logprob": 0.5}'), "refuse", program=bash,
             says="127.0.0.1"),
        Case("fleet answer with more tokens than max_tokens", served('{"too_many": 4}'), "refuse", program=bash,
             says="127.0.0.1"),
        Case("fleet answer with two choices for one", served('{"choices": 2}'), "refuse", program=bash,
             says="127.0.0.1"),
        Case("fleet answer without token_ids", served('{"drop": "token_ids"}'), "refuse", program=bash,
             says="127.0.0.1"),
        Case("fleet answer naming another model", served('{"model": "someone-else"}'), "refuse", program=bash,
             says="127.0.0.1"),
        Case("fleet server with raw log-probs", served("{}", mode="raw"), "refuse", program=bash,
             says="processed_logprobs"),
        Case("fleet server without the dev endpoints", served('{"no_dev_mode": true}'), "refuse", program=bash,
             says="VLLM_SERVER_DEV_MODE"),
        Case("fleet with one dead member", served("{}", urls="$U, http://127.0.0.1:9/v1"), "refuse", program=bash,
             says="http://127.0.0.1:9/v1"),
    ]


def cases_37() -> list[Case]:
    """Issue 37: the asynchronous pipeline's options (every option crossed with its class of bad values, generated from
    PIPELINE_BAD) and behaviours: N larger than the run, a producer slower than the timeout, resuming an asynchronous
    checkpoint with a smaller N or synchronously. The vLLM fleet's server behaviours are in cases_37_fleet."""
    async1 = ["--model.pipeline.max_staleness", "1"]
    cases = [Case(f"fit --model.pipeline.{option} {value}", fit(*async1, f"--model.pipeline.{option}", value), "refuse",
                  says=f"pipeline.{option}")
             for option, values in PIPELINE_BAD.items() for value in values]
    cases += [
        Case("fit max_staleness larger than the run", fit("--model.pipeline.max_staleness", "50"), "run"),
        Case("fit the inline producer", fit(*async1, "--model.pipeline.producer", "inline"), "run"),
        Case("fit a producer slower than its timeout", fit(*async1, "--model.pipeline.timeout", "0.01"), "refuse",
             says="--model.pipeline.timeout"),
        Case("fit the fleet producer without urls", fit(*async1, "--model.pipeline.producer", "vllm_fleet"), "refuse",
             says="pipeline.urls"),
        Case("fit the fleet producer at a server that is down",
             fit(*async1, "--model.pipeline.producer", "vllm_fleet", "--model.pipeline.urls", "[http://127.0.0.1:9/v1]"),
             "refuse", says="127.0.0.1:9"),
    ]
    first = " ".join([sys.executable, "-m", "opdlab.cli", "fit", "--config", FAST, "--trainer.max_steps", "4",
                      "--trainer.enable_progress_bar", "false", "--model.pipeline.max_staleness", "2",
                      "--model.pipeline.producer", "inline", "--run_name", "async",
                      "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                      "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_top_k", "-1"])
    resume = (f"{sys.executable} -m opdlab.cli fit --config {FAST} --trainer.max_steps 4 --run_name again "
              "--ckpt_path runs/fast/async/checkpoints/epoch=0-step=2.ckpt")
    cases += [
        Case("resume an asynchronous checkpoint with a smaller max_staleness", [f"{first} >/dev/null 2>&1 && {resume} "
             "--model.pipeline.max_staleness 1 --model.pipeline.producer inline"], "refuse", program=["bash", "-c"],
             says="resume with max_staleness >= 2"),
        Case("resume an asynchronous checkpoint synchronously", [f"{first} >/dev/null 2>&1 && {resume}"], "warn",
             program=["bash", "-c"]),
    ]
    return cases


def cases_36_placements() -> list[Case]:
    """Issue 36: teacher strings and placement options, as a class: every kind of `--model.teacher` string (each URL
    scheme, malformed addresses, lists), crossed with naming no placement, the wrong one, or an unknown one, and
    placement options given without naming a placement. Nothing listens on port 9: a server there is down."""
    down = "http://127.0.0.1:9/v1"
    strings = {
        "an unclaimed scheme": "grpc://127.0.0.1:9", "a plugin's scheme with no plugin": "sglang://127.0.0.1:9",
        "a file URL": "file:///tmp/teacher", "an http URL without a host": "http://", "an upper-case HTTP URL":
        "HTTP://127.0.0.1:9/v1", "a URL with a port that is not a number": "http://127.0.0.1:port/v1",
        "a list with an empty entry": f"{down},", "a list mixing a URL and a path": f"{down},toy:add2/teacher",
        "an empty string": "", "only commas": ",,", "a server that is down": down,
    }
    cases = [Case(f"fit --model.teacher {name}", fit("--model.teacher", teacher), "refuse")
             for name, teacher in strings.items()]
    for name, teacher in (("a URL", down), ("a checkpoint", "toy:add2/teacher"), ("an unclaimed scheme", "grpc://x")):
        cases += [
            Case(f"fit placement options without a placement name, teacher {name}",
                 fit("--model.teacher", teacher, "--model.teacher_placement.top_logprobs", "4"), "refuse"),
            Case(f"fit an unknown placement name, teacher {name}",
                 fit("--model.teacher", teacher, "--model.teacher_placement", "sglang"), "refuse", says="sglang"),
        ]
    cases += [
        Case("fit the local placement with a URL", fit("--model.teacher", down, "--model.teacher_placement", "local"),
             "refuse", says="is an address"),
        Case("fit the vllm_server placement with a checkpoint",
             fit("--model.teacher", "toy:add2/teacher", "--model.teacher_placement", "vllm_server"), "refuse",
             says="needs --model.teacher to be the server's URL"),
        Case("diagnose with a teacher of an unclaimed scheme",
             ["diagnose", "--config", DIAGNOSE, "--teacher", "grpc://127.0.0.1:9"], "refuse",
             says="no teacher placement accepts"),
    ]
    return cases


def cases_36() -> list[Case]:
    """Issue 36: peft adapters opdlab cannot merge exactly (DoRA, modules_to_save, per-layer ranks, rsLoRA, ...),
    through each way an adapter folder enters: `--model.student_adapter.path`, `opdlab eval --model`, and an adapter
    folder given as the student itself. Adapters of toy:add2/student's q_proj layers (64 x 64, 2 layers), as
    PeftModel.save_pretrained writes them."""
    import json

    plain = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "none",
             "base_model_name_or_path": "toy:add2/student", "task_type": "CAUSAL_LM", "use_dora": False,
             "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "init_lora_weights": True}
    prefix = "base_model.model.model.layers"
    lora = {f"{prefix}.{i}.self_attn.q_proj.lora_{ab}.weight": shape for i in range(2)
            for ab, shape in (("A", (4, 64)), ("B", (64, 4)))}
    dora = {**lora, **{f"{prefix}.{i}.self_attn.q_proj.lora_magnitude_vector": (64,) for i in range(2)}}

    def adapter(folder: str, weights: dict = lora, **fields) -> dict[str, str | bytes]:
        return {f"{folder}/adapter_config.json": json.dumps({**plain, **fields}),
                f"{folder}/adapter_model.safetensors": safetensors_bytes(weights)}

    def path(name: str, folder: str, says: str, weights: dict = lora, **fields) -> Case:
        return Case(f"fit student_adapter.path {name}", fit("--model.student_adapter.path", folder), "refuse",
                    files=adapter(folder, weights, **fields), says=says)

    return [
        path("a DoRA adapter", "dora", "use_dora=true (DoRA", dora, use_dora=True),
        path("with modules_to_save", "mts", 'modules_to_save=["lm_head"]',
             {**lora, "base_model.model.lm_head.weight": (40, 64)}, modules_to_save=["lm_head"]),
        path("with a rank_pattern", "rp", 'rank_pattern={"layers.1.self_attn.q_proj": 2}',
             rank_pattern={"layers.1.self_attn.q_proj": 2}),
        path("with an alpha_pattern", "ap", "alpha_pattern=", alpha_pattern={"q_proj": 32}),
        path("with rsLoRA", "rs", "use_rslora=true", use_rslora=True),
        path("with trained biases", "bias", 'bias="all"', bias="all"),
        path("with a bias on lora_B", "lb", "lora_bias=true", lora_bias=True),
        path("on some layers only", "ltt", "layers_to_transform=[0]", layers_to_transform=[0]),
        path("with a regex target", "re", 'target_modules=".*\\\\.q_proj"', target_modules=".*\\.q_proj"),
        path("with a PiSSA initialisation", "pissa", 'init_lora_weights="pissa"', init_lora_weights="pissa"),
        path("of a task other than causal LM", "cls", 'task_type="SEQ_CLS"', task_type="SEQ_CLS"),
        path("with a field a newer peft wrote", "new", "which peft", use_quantum_lora=True),
        path("whose config hides DoRA (use_dora false, magnitude vectors in the file)", "hid",
             "lora_magnitude_vector", dora),
        Case("eval --model a DoRA adapter", ev("--model", "dora"), "refuse", files=adapter("dora", dora, use_dora=True),
             says="--model dora: its adapter_config.json sets use_dora=true"),
        Case("eval --model an adapter with modules_to_save", ev("--model", "mts"), "refuse",
             files=adapter("mts", {**lora, "base_model.model.lm_head.weight": (40, 64)}, modules_to_save=["lm_head"]),
             says="modules_to_save="),
        Case("eval --model an adapter with rsLoRA", ev("--model", "rs"), "refuse", files=adapter("rs", use_rslora=True),
             says="use_rslora=true"),
        Case("fit --model.student an adapter folder (not a model)", fit("--model.student", "plain"), "refuse",
             files=adapter("plain"), says="is a peft adapter folder"),
        Case("fit student_adapter.path a plain peft adapter (dropout, gaussian init: valid)",
             fit("--model.student_adapter.path", "ok"), "run",
             files=adapter("ok", lora_dropout=0.05, init_lora_weights="gaussian", inference_mode=True)),
        Case("eval --model a plain peft adapter (valid)", ev("--model", "ok"), "run", files=adapter("ok")),
    ]


GPU_ACCEPTANCE = [sys.executable, str(REPO / "benchmarks" / "gpu_acceptance.py")]


def cases_31() -> list[Case]:
    """benchmarks/gpu_acceptance.py, the GPU acceptance script."""
    def ga(name: str, *args: str, **kw) -> Case:
        return Case(f"gpu_acceptance {name}", list(args), "refuse", program=GPU_ACCEPTANCE, **kw)

    return [
        ga("--device tpu", "--device", "tpu"),
        ga("--device cuda without a wheelhouse", "--device", "cuda", "--wheelhouse", "nowheels"),
        ga("--output in an unwritable place", "--device", "cpu", "--output", "/proc/gpu.md"),
        ga("--output is a folder", "--device", "cpu", "--output", "out", files={"out/keep": ""}),
        ga("--fits with an unknown engine", "--device", "cpu", "--fits", "ta_opd:trl"),
        ga("--rows 12 (8 samples per prompt)", "--device", "cpu", "--rows", "12"),
        ga("--steps 0", "--device", "cpu", "--steps", "0"),
        ga("--budget-s 0", "--device", "cpu", "--budget-s", "0"),
        ga("a stray argument", "--device", "cpu", "stray"),
        ga("--list-missing, one requirement nowhere", "--list-missing", "--require", "opdlab-no-such-package"),
    ]


def safetensors_bytes(shapes: dict[str, tuple[int, ...]]) -> bytes:
    """A safetensors file's bytes holding zero tensors of these shapes."""
    import torch
    from safetensors.torch import save

    return save({name: torch.zeros(shape) for name, shape in shapes.items()})


def cases_30() -> list[Case]:
    """LoRA students (`--model.student_adapter.*`)."""
    import json

    lora = ["--model.student_adapter.rank", "8"]
    other_base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                  "base_model_name_or_path": "toy:add3/student"}
    return [
        Case("fit student_adapter.rank 0", fit("--model.student_adapter.rank", "0"), "refuse"),
        Case("fit student_adapter.rank -3", fit("--model.student_adapter.rank", "-3"), "refuse"),
        Case("fit student_adapter.rank 2.5", fit("--model.student_adapter.rank", "2.5"), "refuse"),
        Case("fit student_adapter.dropout 1.5", fit(*lora, "--model.student_adapter.dropout", "1.5"), "refuse"),
        Case("fit student_adapter.alpha 0", fit(*lora, "--model.student_adapter.alpha", "0"), "refuse"),
        Case("fit student_adapter targets that match nothing",
             fit(*lora, "--model.student_adapter.target_modules", "[query_key_value]"), "refuse"),
        Case("fit student_adapter targets empty list", fit(*lora, "--model.student_adapter.target_modules", "[]"),
             "refuse"),
        Case("fit student_adapter.path missing", fit("--model.student_adapter.path", "nowhere"), "refuse"),
        Case("fit student_adapter.path not an adapter folder", fit("--model.student_adapter.path", "empty"), "refuse",
             files={"empty/README": "x"}),
        Case("fit student_adapter.path with a broken adapter_config.json", fit("--model.student_adapter.path", "bad"),
             "refuse", files={"bad/adapter_config.json": "{not json", "bad/adapter_model.safetensors": b"x"}),
        Case("fit student_adapter.path whose adapter_config.json is a list", fit("--model.student_adapter.path", "lst"),
             "refuse", files={"lst/adapter_config.json": "[1, 2]", "lst/adapter_model.safetensors": b"x"}),
        Case("fit student_adapter.path whose adapter_config.json is not UTF-8", fit("--model.student_adapter.path", "bin"),
             "refuse", files={"bin/adapter_config.json": b"\xff\xfe{}", "bin/adapter_model.safetensors": b"x"}),
        Case("fit student_adapter.path of a prefix-tuning adapter", fit("--model.student_adapter.path", "pfx"), "refuse",
             files={"pfx/adapter_config.json": json.dumps({**other_base, "peft_type": "PREFIX_TUNING"}),
                    "pfx/adapter_model.safetensors": b"x"}),
        Case("fit student_adapter.path with a LoRA config peft cannot read", fit("--model.student_adapter.path", "odd"),
             "refuse", files={"odd/adapter_config.json": json.dumps({**other_base, "r": "eight", "no_such_field": 1}),
                              "odd/adapter_model.safetensors": safetensors_bytes(
                                  {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (4, 8)})}),
        Case("fit student_adapter.path with damaged adapter weights", fit("--model.student_adapter.path", "dmg"),
             "refuse", files={"dmg/adapter_config.json": json.dumps(other_base),
                              "dmg/adapter_model.safetensors": b"not safetensors at all"}),
        Case("eval --model an adapter folder whose adapter_config.json is a list", ev("--model", "lst"), "refuse",
             files={"lst/adapter_config.json": "[1, 2]", "lst/adapter_model.safetensors": b"x"}),
        Case("fit student_adapter.path of another base model", fit("--model.student_adapter.path", "other"), "refuse",
             files={"other/adapter_config.json": json.dumps(other_base),
                    "other/adapter_model.safetensors": safetensors_bytes(
                        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (4, 999)})}),
        Case("fit student_adapter with an engine that cannot load adapters",
             fit(*lora, "--model.rollout_engine", "noadapters.PlainEngine"), "refuse",
             files={"noadapters.py": "from opdlab.engines import ReferenceEngine\n\n"
                    "class PlainEngine(ReferenceEngine):\n    loads_adapters = False\n"},
             env={"PYTHONPATH": "."}),
        Case("fit student_adapter without peft", fit(*lora), "refuse", env={"PYTHONPATH": "nopeft"},
             files={"nopeft/sitecustomize.py": "import sys\nsys.modules['peft'] = None  # as if not installed\n"}),
        Case("fit student_adapter.rank 8 (valid)", fit(*lora), "run"),
    ]


def cases_28_retest() -> list[Case]:
    """Issue 28, second pass: what a re-test of the fixed surfaces still found (a traceback on a non-finite stop and
    on null groups, settings that were silently ignored, names that hide a run, a resume pointed outside its run)."""
    c = [Case("retest: fit non-finite steps past max_bad_steps (a traceback before)",
              fit("--model.optimizer.init_args.lr", "1e30", "--model.training.max_bad_steps", "0",
                  "--trainer.max_steps", "3"), "refuse")]
    for label, text in [("model: null", "model: null\n"), ("model: {rollout: null}", "model:\n  rollout: null\n"),
                        ("model: {training: null}", "model:\n  training: null\n"), ("trainer: null", "trainer: null\n"),
                        ("data: null", "data: null\n")]:
        c.append(Case(f"retest: config file {label}", ["fit", "--config", FAST, "--config", "k.yaml", *SHORT], "refuse",
                      files={"k.yaml": text}))
    for label, option, text in [("an empty --config", "--config", ""), ("an empty --eval file", "--eval", ""),
                                ("an --eval file that is a list", "--eval", "- a\n- b\n")]:
        c.append(Case(f"retest: fit {label}", fit(option, "s.yaml"), "refuse", files={"s.yaml": text}))
    c.append(Case("retest: eval an empty --config", ["eval", "--config", "s.yaml", "--model", "toy:add3/student"],
                  "refuse", files={"s.yaml": ""}))
    c.append(Case("retest: fit --eval.k without benchmarks (ignored before)", fit("--eval.k", "4"), "refuse"))
    c.append(Case("retest: fit --eval.temperature without benchmarks", fit("--eval.temperature", "0.5"), "refuse"))
    c.append(Case("retest: validate --eval.k (ignored before)", ["validate", "--config", FAST, "--eval.k", "4"], "refuse"))
    for name in (".hidden", "..."):
        c.append(Case(f"retest: fit --run_name {name}", fit("--run_name", name), "refuse"))
    c.append(Case("retest: fit --resume --ckpt_path outside the run", fit("--run_name", "r", "--resume", "--ckpt_path",
                                                                          "o.ckpt"), "refuse",
                  files={"runs/fast/r/checkpoints/a.ckpt": b"x", "o.ckpt": b"x"}))
    c.append(Case("retest: fit --resume, no last.ckpt but another checkpoint", fit("--run_name", "r", "--resume"),
                  "refuse", files={"runs/fast/r/checkpoints/epoch=0-step=1.ckpt": b"x"}))
    return c


def cases_28_parser() -> list[Case]:
    """Issue 28, third pass: values jsonargparse refuses, in every command built on it. Refused they were, but the
    line named `Parser key "lr"` (not the option), came from the nested parser as `opdlab` with the wrong --help,
    or followed the usage of every option; `says` is what the one line must now name."""
    eval_toy = ["eval", "--config", EVAL_TOY, "--model", "toy:add3/student"]
    selector = "model:\n  selector:\n    class_path: opdlab.selectors.TeachabilitySelector\n    init_args: {rati: 0.1}\n"
    optimizer = "model:\n  optimizer:\n    class_path: torch.optim.AdamW\n    init_args: {lr: nan}\n"
    c = [Case(f"parser: fit {' '.join(args)}", fit(*args), "refuse", says=says) for args, says in [
        (["--model.optimizer.init_args.lr", "nan"], "--model.optimizer.init_args.lr: expected float or Tensor"),
        (["--model.optimizer.init_args.lr", "[1]"], "--model.optimizer.init_args.lr: expected float or Tensor"),
        (["--model.optimizer.init_args.lrr", "0.1"], "AdamW takes no option 'lrr' (did you mean 'lr'?)"),
        (["--model.optimizer.class_path", "torch.optim.Adamm"], "class_path 'torch.optim.Adamm' does not import"),
        (["--model.selector.init_args.ratio", "abc"], "--model.selector.init_args.ratio: expected float, got 'abc'"),
        (["--model.selector.init_args.top_k", "2.5"], "--model.selector.init_args.top_k: expected int"),
        (["--model.selector.init_args.rati", "0.1"], "TeachabilitySelector takes no option 'rati'"),
        (["--model.divergence.init_args.beta", "0.5"], "ReverseKL takes no option 'beta'"),
        (["--model.selector.class_path", "nosuchmodule.Selector"], "No module named 'nosuchmodule'"),
        (["--model.rollout", "null"], "--model.rollout: 'null' is not a value this group of options takes"),
        (["--model.rollout", "5"], "--model.rollout: '5' is not a value this group of options takes"),
        (["--model.training.gradient_clip_val", "nan"], "--model.training.gradient_clip_val: expected float or null"),
        (["--trainer.max_steps", "1.5"], "--trainer.max_steps: expected int, got '1.5'"),
    ]]
    c += [Case("parser: fit config file init_args {rati: 0.1}", ["fit", "--config", FAST, "--config", "k.yaml", *SHORT],
               "refuse", files={"k.yaml": selector}, says="--model.selector.init_args.rati"),
          Case("parser: fit config file init_args {lr: nan}", ["fit", "--config", FAST, "--config", "k.yaml", *SHORT],
               "refuse", files={"k.yaml": optimizer}, says="--model.optimizer.init_args.lr")]
    c += [Case(f"parser: {name}", args, "refuse", says=says) for name, args, says in [
        ("eval --pass_at 5", [*eval_toy, "--pass_at", "5"], "(a list is written in brackets: --pass_at '[5]')"),
        ("eval --seeds 3", [*eval_toy, "--seeds", "3"], "--seeds: expected list"),
        ("eval --benchmarks.limit x", [*eval_toy, "--benchmarks.limit", "x"], "--benchmarks.limit: expected int or null"),
        ("eval --temperature warm", [*eval_toy, "--temperature", "warm"], "--temperature: expected float"),
        ("eval --kk 3", [*eval_toy, "--kk", "3"], "unrecognized arguments: --kk 3"),
        ("compare --seeds 3", ["compare", "--seeds", "3"], "--seeds: expected list"),
        ("compare --fit_config 5", ["compare", "--fit_config", "5"], "--fit_config: expected list"),
        ("compare --seedz 3", ["compare", "--seedz", "3"], "opdlab compare: error: unrecognized arguments"),
        ("diagnose --train.steps x", ["diagnose", "--config", DIAGNOSE, "--train.steps", "x"],
         "--train.steps: expected int, got 'x'"),
        ("diagnose --top_k 4", ["diagnose", "--config", DIAGNOSE, "--top_k", "4"], "opdlab diagnose: error: unrecognized"),
        ("toy --seed x", ["toy", "--seed", "x"], "opdlab toy: error: --seed: expected int, got 'x'"),
    ]]
    return c


def cases_28() -> list[Case]:
    """Issue 28: the newer surfaces (eval, datasets files, run folders, signals after training, config groups)."""
    import gzip

    c = []
    # --- run folders (data loss and paths)
    for name in ("../escape", ".", "a/b", "/tmp/abs"):
        c.append(Case(f"fit --run_name {name}", fit("--run_name", name), "refuse"))
    c.append(Case("fit --run_name of a finished run without checkpoints", fit("--run_name", "done"), "refuse",
                  files={"runs/fast/done/summary.json": "{}", "runs/fast/done/student/config.json": "{}",
                         "runs/fast/done/config.yaml": "x: 1\n"}))
    c.append(Case("fit --resume with a truncated last.ckpt", fit("--run_name", "r", "--resume"), "refuse",
                  files={"runs/fast/r/checkpoints/last.ckpt": b"PK\x03\x04" + bytes(100)}))
    c.append(Case("fit a stale lock of an unrelated process", fit("--run_name", "mine"), "refuse",
                  files={"runs/fast/mine/.opdlab.lock": "1"}))
    c.append(Case("fit --model.memory.student_dtype float16", fit("--model.memory.student_dtype", "float16"), "refuse"))
    c.append(Case("fit --trainer.fast_dev_run true (writes nothing)", fit("--trainer.fast_dev_run", "true"), "run"))
    c.append(Case("fit a GPU config on a CPU machine", ["fit", "--config", str(REPO / "configs" / "qwen3_8b_to_1.7b_ta_opd.yaml"),
                                                         "--model.rollout_engine", "static"], "refuse"))
    c.append(Case("validate --eval (ignored before)", ["validate", "--config", FAST, "--eval", EVAL_TOY], "refuse"))
    c.append(Case("plugins OPDLAB_DISABLE_PLUGINS=maybe", ["plugins"], "refuse", env={"OPDLAB_DISABLE_PLUGINS": "maybe"}))
    c.append(Case("plugins OPDLAB_DISABLE_PLUGINS=off (plugins stay on)", ["plugins"], "run",
                  env={"OPDLAB_DISABLE_PLUGINS": "off"}))
    # --- config files: groups given one value, top level not a mapping
    for label, text in [("model: {rollout: 5}", "model:\n  rollout: 5\n"), ("trainer: 3", "trainer: 3\n"),
                        ("a list", "- a\n- b\n"), ("model: {memory: [1, 2]}", "model:\n  memory: [1, 2]\n"),
                        ("data: text", "data: prompts.jsonl\n")]:
        c.append(Case(f"config file {label}", ["fit", "--config", FAST, "--config", "k.yaml", *SHORT], "refuse",
                      files={"k.yaml": text}))
    # --- data files (opdlab.tasks.JsonlPrompts / DatasetPrompts)
    c.append(Case("jsonl given a parquet file", fit(*data("p.parquet")), "refuse", files={"p.parquet": parquet_bytes(ROWS)}))
    c.append(Case("jsonl given parquet bytes named .jsonl", fit(*data("p.jsonl")), "refuse", files={"p.jsonl": parquet_bytes(ROWS)}))
    c.append(Case("jsonl given a CSV file", fit(*data("p.csv")), "refuse", files={"p.csv": CSV}))
    c.append(Case("jsonl eval_path a parquet file", fit(*data("g.jsonl", "--data.source.init_args.eval_path", "e.parquet")),
                  "refuse", files={"g.jsonl": jsonl(GOOD), "e.parquet": parquet_bytes(ROWS)}))
    c.append(Case("jsonl gzip-compressed", fit(*data("z.jsonl")), "refuse", files={"z.jsonl": gzip.compress(jsonl(GOOD).encode())}))
    c.append(Case("jsonl num_eval 0", fit(*data("g.jsonl", "--data.source.init_args.num_eval", "0")), "refuse",
                  files={"g.jsonl": jsonl(GOOD)}))
    c.append(Case("jsonl num_eval negative", fit(*data("g.jsonl", "--data.source.init_args.num_eval", "-250")), "refuse",
                  files={"g.jsonl": jsonl(GOOD)}))
    c.append(Case("datasets CSV answers with leading zeros", fit(*dsdata("z.csv")), "run", files={"z.csv": CSV}))
    c.append(Case("datasets TSV", fit(*dsdata("z.tsv")), "run", files={"z.tsv": CSV.replace(",", "\t")}))
    c.append(Case("datasets folder mixing parquet and CSV", fit(*dsdata("mix")), "refuse",
                  files={"mix/a.parquet": parquet_bytes(ROWS), "mix/b.parquet": parquet_bytes(ROWS), "mix/c.csv": CSV}))
    c.append(Case("datasets folder outnumbered by .txt notes", fit(*dsdata("notes")), "refuse",
                  files={"notes/a.csv": CSV, "notes/n1.txt": "x\n", "notes/n2.txt": "y\n"}))
    c.append(Case("datasets glob of one format", fit(*dsdata("mix/*.parquet")), "run",
                  files={"mix/a.parquet": parquet_bytes(ROWS), "mix/c.csv": CSV}))
    c.append(Case("datasets glob matching nothing", fit(*dsdata("nodir/*.parquet")), "refuse"))
    c.append(Case("datasets missing file with one slash (not a hub id)", fit(*dsdata("data/nothere.parquet")), "refuse"))
    c.append(Case("datasets split test of a single file", fit(*dsdata("p.parquet", "--data.source.init_args.split", "test")),
                  "refuse", files={"p.parquet": parquet_bytes(ROWS)}))
    c.append(Case("datasets num_eval negative", fit(*dsdata("p.parquet", "--data.source.init_args.num_eval", "-250")), "refuse",
                  files={"p.parquet": parquet_bytes(ROWS)}))
    c.append(Case("datasets num_eval 0", fit(*dsdata("p.parquet", "--data.source.init_args.num_eval", "0")), "refuse",
                  files={"p.parquet": parquet_bytes(ROWS)}))
    c.append(Case("datasets empty parquet", fit(*dsdata("e.parquet")), "refuse",
                  files={"e.parquet": parquet_bytes({"prompt": [], "answer": []})}))
    c.append(Case("datasets zero-byte CSV", fit(*dsdata("z.csv")), "refuse", files={"z.csv": ""}))
    c.append(Case("datasets header-only CSV", fit(*dsdata("h.csv")), "refuse", files={"h.csv": "prompt,answer\n"}))
    c.append(Case("datasets .parquet holding CSV text", fit(*dsdata("f.parquet")), "refuse", files={"f.parquet": CSV}))
    c.append(Case("datasets .csv holding parquet bytes", fit(*dsdata("f.csv")), "refuse", files={"f.csv": parquet_bytes(ROWS)}))
    c.append(Case("datasets truncated parquet", fit(*dsdata("t.parquet")), "refuse", files={"t.parquet": parquet_bytes(ROWS)[:40]}))
    c.append(Case("datasets prompt_field missing", fit(*dsdata("p.parquet", "--data.source.init_args.prompt_field", "question")),
                  "refuse", files={"p.parquet": parquet_bytes(ROWS)}))
    c.append(Case("datasets prompt column of integers", fit(*dsdata("i.parquet")), "refuse",
                  files={"i.parquet": parquet_bytes({"prompt": list(range(40)), "answer": ROWS["answer"]})}))
    c.append(Case("datasets CSV empty answer cell", fit(*dsdata("b.csv")), "refuse", files={"b.csv": CSV + "9+9=,\n"}))
    c.append(Case("datasets unknown suffix", fit(*dsdata("p.xlsx")), "refuse", files={"p.xlsx": b"PK\x03\x04junk"}))
    c.append(Case("validate prompts the toy tokenizer cannot read", ["validate", "--config", FAST, *dsdata("w.csv")], "warn",
                  files={"w.csv": CSV.replace("=,", "= ?,")}))
    # --- opdlab eval
    evq = ["eval", "--model", "toy:add2/student", "--k", "1", "--max_new_tokens", "4"]
    c.append(Case("eval CSV keeps leading zeros", [*evq, "--benchmarks", "[{name: z, path: z.csv, verifier: exact, limit: 8}]"],
                  "run", files={"z.csv": CSV}))
    c.append(Case("eval split test of a single file", [*evq, "--benchmarks", "[{name: z, path: z.csv, split: test}]"], "refuse",
                  files={"z.csv": CSV}))
    c.append(Case("eval prompt_template the toy tokenizer cannot read",
                  [*evq, "--benchmarks", '[{name: z, path: z.csv, verifier: exact, limit: 8, prompt_template: "Question: {prompt}"}]'],
                  "warn", files={"z.csv": CSV}))
    student = ("--model", "toy:add3/student")
    c.append(Case("eval overwrite with a chat template the tokenizer lacks",
                  ev(*student, "--out_dir", "o", "--overwrite", "true", "--chat_template", "true"), "refuse",
                  files={"o/responses.jsonl": REC, "o/eval.json": "{}"}))
    c.append(Case("eval chat_template on a base model", ev(*student, "--chat_template", "true", "--out_dir", "o"), "refuse"))
    c.append(Case("eval run folder without student/", ev("--model", "run/version_0"), "refuse",
                  files={"run/version_0/hparams.yaml": "student: x\n", "run/version_0/checkpoints/last.ckpt": b"PK\x03\x04 cut"}))
    c.append(Case("eval a checkpoints folder", ev("--model", "run/version_0/checkpoints"), "refuse",
                  files={"run/version_0/checkpoints/last.ckpt": b"PK\x03\x04"}))
    c.append(Case("eval truncated .ckpt", ev("--model", "last.ckpt"), "refuse", files={"last.ckpt": b"PK\x03\x04\x14\x00" + bytes(200)}))
    c.append(Case("eval one weights file as the model", ev("--model", "m/model.safetensors"), "refuse",
                  files={"m/config.json": "{}", "m/model.safetensors": bytes(16)}))
    c.append(Case("eval model dir without weights", ev("--model", "m"), "refuse", files={"m/config.json": '{"model_type": "qwen2"}'}))
    c.append(Case("eval responses.jsonl without eval.json", ev(*student, "--out_dir", "o"), "refuse", files={"o/responses.jsonl": REC}))
    c.append(Case("eval result.json without eval.json", ev(*student, "--out_dir", "o"), "refuse", files={"o/result.json": "{}"}))
    c.append(Case("eval eval.json from before fingerprints", ev(*student, "--out_dir", "o"), "refuse",
                  files={"o/eval.json": '{"model": "toy:add3/student", "k": 2}', "o/responses.jsonl": REC}))
    c.append(Case("eval damaged eval.json", ev(*student, "--out_dir", "o"), "refuse",
                  files={"o/eval.json": "{not json", "o/responses.jsonl": REC}))
    c.append(Case("eval eval.json is a list", ev(*student, "--out_dir", "o"), "refuse",
                  files={"o/eval.json": "[1, 2]", "o/responses.jsonl": REC}))
    c.append(Case("eval empty responses.jsonl starts fresh", ev(*student, "--out_dir", "o"), "run", files={"o/responses.jsonl": ""}))
    c.append(Case("eval config top level is a list", ["eval", "--config", "e.yaml", *student], "refuse",
                  files={"e.yaml": "- k: 2\n- temperature: 1\n"}))
    c.append(Case("eval config is a scalar", ["eval", "--config", "e.yaml", *student], "refuse", files={"e.yaml": "8\n"}))
    c.append(Case("eval config not YAML", ["eval", "--config", "e.yaml", *student], "refuse", files={"e.yaml": "k: [1\n"}))
    c.append(Case("eval config missing", ["eval", "--config=none.yaml", *student], "refuse"))
    c.append(Case("eval damaged benchmark file", ev(*student, "--benchmarks", "[{name: s, path: b.jsonl}]", "--max_new_tokens", "4"),
                  "refuse", files={"b.jsonl": '{"problem": "1+1", "answer": "2"}\nnot json\n'}))
    c.append(Case("eval benchmark with an empty name", ev(*student, "--benchmarks", '[{name: "", path: "toy:add3"}]'), "refuse"))
    c.append(Case("eval benchmark with an empty path", ev(*student, "--benchmarks", '[{name: a, path: ""}]'), "refuse"))
    c.append(Case("eval toy benchmark with a split", ev(*student, "--benchmarks", '[{name: a, path: "toy:add3", split: test}]'),
                  "refuse"))
    c.append(Case("eval k not a number", ev(*student, "--k", "many"), "refuse"))
    c.append(Case("eval toy student with the default out_dir", ev(*student), "run"))
    # --- compare and diagnose
    cmp = ["compare", "--seeds", "[0]", "--steps", "1", "--overlays_dir", SELECTORS, "--fit_config", f"[{FAST}]",
           "--selectors", "[full]"]
    c.append(Case("compare eval_config is a folder", [*cmp, "--eval_config", "."], "refuse"))
    c.append(Case("compare eval_config missing", [*cmp, "--eval_config", "none.yaml"], "refuse"))
    c.append(Case("compare eval_config not YAML", [*cmp, "--eval_config", "e.yaml"], "refuse", files={"e.yaml": "benchmarks: [\n  k: :\n"}))
    c.append(Case("compare eval_config a list", [*cmp, "--eval_config", "e.yaml"], "refuse", files={"e.yaml": "- add3\n- k: 2\n"}))
    c.append(Case("compare eval_config unknown key", [*cmp, "--eval_config", "e.yaml"], "refuse",
                  files={"e.yaml": "benchmarks: [{name: add3, path: 'toy:add3'}]\nkk: 2\n"}))
    c.append(Case("compare eval_config without benchmarks", [*cmp, "--eval_config", "e.yaml"], "refuse", files={"e.yaml": "k: 2\n"}))
    c.append(Case("compare eval_config k 0", [*cmp, "--eval_config", "e.yaml"], "refuse",
                  files={"e.yaml": "benchmarks: [{name: add3, path: 'toy:add3'}]\nk: 0\n"}))
    c.append(Case("compare rank_by eval without eval_config", [*cmp, "--rank_by", "eval"], "refuse"))
    c.append(Case("compare seeds repeat", [*cmp, "--seeds", "[0,0]"], "refuse"))
    c.append(Case("compare threads 0", [*cmp, "--threads", "0"], "refuse"))
    c.append(Case("compare top_k 0", [*cmp[:-2], "--selectors", "[teachability]", "--top_k", "0"], "refuse"))
    c.append(Case("compare overlays_dir missing", [*cmp, "--overlays_dir", "nowhere"], "refuse"))
    c.append(Case("compare fit_config empty", [*cmp, "--fit_config", "[]"], "refuse"))
    c.append(Case("compare saved result.json truncated", [*cmp, "--out_dir", "o"], "refuse",
                  files={"o/runs/full/seed0/result.json": '{"ok": tr'}))
    dia = ["diagnose", "--config", DIAGNOSE]
    for key, value in [("stats.winsorize", "[0.6]"), ("stats.winsorize", "[]"), ("stats.min_base_kl", "-1"),
                       ("stats.min_base_kl", "0")]:
        c.append(Case(f"diagnose --{key} {value}", [*dia, f"--{key}", value, "--out_dir", "d"], "refuse"))
    c.append(Case("diagnose bank path not a bank", [*dia, "--bank.path", "b.pt", "--out_dir", "d"], "refuse",
                  files={"b.pt": "hello\n"}))
    return c


def cases_before_28() -> list[Case]:
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
        proc = subprocess.run([*(case.program or [sys.executable, "-m", "opdlab.cli"]), *case.args], cwd=folder, capture_output=True, text=True,
                              timeout=timeout, env={**env, **case.env}, errors="replace")
        rc, out = proc.returncode, proc.stdout + "\n" + proc.stderr
    except subprocess.TimeoutExpired:
        rc, out = None, ""
    outcome, line = classify(rc, out)
    expected = {"refuse": "refused (one line)", "warn": "warned", "run": ("ran silently", "warned")}[case.expect]
    ok = outcome in expected if isinstance(expected, tuple) else outcome == expected
    ok = ok and case.says in line
    return {"case": case.name, "expect": case.expect, "outcome": outcome, "ok": ok, "line": line[:160],
            "seconds": time.perf_counter() - started}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--timeout", type=int, default=180, help="seconds per case")
    p.add_argument("--only", help="run the cases whose name contains this")
    p.add_argument("--issue", type=int, help="run the cases added by this issue only (0: those from before issue 28)")
    p.add_argument("--output", help="append the markdown result here")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="opdlab_adversarial_"))
    env = {**os.environ, "OPDLAB_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    selected = [c for c in cases() if (not args.only or args.only in c.name) and (args.issue is None or c.issue == args.issue)]
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
