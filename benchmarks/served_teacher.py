"""A teacher on a vLLM server against the local teacher (issue 27): how good the top-k approximation is, and
what the wire costs.

    # accuracy on the toys: the same student rollouts scored by the local teacher and by a served one
    python benchmarks/served_teacher.py accuracy --toy add3 --url http://127.0.0.1:8711/v1
    python benchmarks/served_teacher.py accuracy --toy mix4 --url http://127.0.0.1:8712/v1
    # cost at a 151,936-token vocabulary (random weights: cost only); starts and stops its own vLLM server
    python benchmarks/served_teacher.py cost --out benchmarks/results/served_teacher/cost.json

`accuracy` needs a server of the toy's teacher that allows the whole vocabulary (`--max-logprobs -1`, the
README's command) and reports, per k in {full, 8, 4}: the largest error of the teacher's log-prob of the
sampled token, C's lower bound and its gap to the upper bound against the exact C, the error of D, and the
Jaccard overlap of the positions TA-OPD keeps at 5% with those it keeps with the local teacher.
`cost` reports bytes per response token on the wire (JSON, and gzip with vLLM's --middleware
starlette.middleware.gzip.GZipMiddleware) and seconds per training step for k in {full, 64, 20} beside the
local teacher. Run it with the vllm environment's python (.venv-vllm): it starts `vllm.entrypoints.openai.api_server`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

TOYS = {"add3": ("configs/ta_opd.yaml", "toy:add3"), "mix4": ("configs/ta_opd_mix4.yaml", "toy:mix4")}


def module_for(toy: str, teacher: str, placement=None):
    import yaml

    from opdlab.module import OPDModule
    from opdlab.selectors import TeachabilitySelector

    config = yaml.safe_load(Path(TOYS[toy][0]).read_text())["model"]
    init = config["selector"]["init_args"]
    selector = TeachabilitySelector(ratio=0.05, top_k=init["top_k"], per_response_floor=init.get("per_response_floor", True))
    module = OPDModule(student=config["student"], teacher=teacher, selector=selector, teacher_placement=placement,
                       rollout=config["rollout"])
    module.configure_model()
    return module


def accuracy(args) -> dict:
    """The same rollouts, scored by the local teacher and by the server at each k."""
    from opdlab.diagnostics.probe import token_stats
    from opdlab.rollout import encode_prompts
    from opdlab.tasks import AdditionTask, ScratchpadAdditionTask
    from opdlab.teachers import VLLMServerTeacher

    torch.manual_seed(0)
    local = module_for(args.toy, f"{TOYS[args.toy][1]}/teacher")
    task = AdditionTask(digits=3) if args.toy == "add3" else ScratchpadAdditionTask(digits=4)  # the configs' sources
    problems = [task.problem_at(i) for i in range(args.prompts)]
    prompts = encode_prompts(local.tokenizer, [p.prompt for p in problems], [p.answer for p in problems])
    rollout = local.rollout(prompts, seeds=list(range(args.prompts)))
    exact = token_stats(local, rollout)
    keep = local.select(exact)
    valid = exact.valid
    rows = {}
    for k in ("full", 8, 4):
        served = module_for(args.toy, args.url, VLLMServerTeacher(top_logprobs=k))
        served.student.load_state_dict(local.student.state_dict())
        stats = token_stats(served, rollout)
        kept = served.select(stats)
        upper = stats.compatibility_upper if stats.compatibility_upper is not None else stats.compatibility
        rows[str(k)] = {
            "teacher_logp_max_abs_error": float((stats.teacher_token_logp - exact.teacher_token_logp)[valid].abs().max()),
            "C_mean_abs_error": float((stats.compatibility - exact.compatibility)[valid].abs().mean()),
            "C_max_abs_error": float((stats.compatibility - exact.compatibility)[valid].abs().max()),
            # within the server's own arithmetic (its log-probs differ from the local model's by up to ~1e-4)
            "C_bounds_hold": bool(((stats.compatibility <= exact.compatibility + 1e-4)
                                   & (exact.compatibility <= upper + 1e-4))[valid].all()),
            "C_mean_bound_gap": float((upper - stats.compatibility)[valid].mean()),
            "D_mean_abs_error": float((stats.disagreement - exact.disagreement)[valid].abs().mean()),
            "D_p95_abs_error": float(torch.quantile((stats.disagreement - exact.disagreement)[valid].abs(), 0.95)),
            "D_mean": float(exact.disagreement[valid].mean()),
            "jaccard_kept_5pct": float((kept & keep).sum() / (kept | keep).sum()),
            "kept": int(kept.sum()), "valid": int(valid.sum()),
        }
        print(args.toy, k, json.dumps(rows[str(k)]), flush=True)
    return {"toy": args.toy, "prompts": args.prompts, "selector_top_k": local.selector.top_k, "rows": rows}


# --------------------------------------------------------------------------------------------- cost
def word_tokenizer(vocab: int):
    """A word-level tokenizer of `vocab` tokens ("w0".."wN", Qwen-length strings), so a 151,936-logit model has a
    tokenizer of its size without a download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    words.update({f"w{i}": i for i in range(3, vocab - 1)})
    core = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   padding_side="left")


def random_models(vocab: int, root: Path) -> tuple[str, str]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from opdlab.models import load_tokenizer

    tokenizer = word_tokenizer(vocab)
    paths = []
    for name, hidden, seed in (("student", 64, 1), ("teacher", 128, 2)):
        torch.manual_seed(seed)
        config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2,
                             intermediate_size=2 * hidden, num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                             bos_token_id=2)
        path = root / name
        model = Qwen2ForCausalLM(config)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        loaded = len(load_tokenizer(str(path)))  # what every loader sees (beside the config it can differ by one)
        if loaded != config.vocab_size:
            model.resize_token_embeddings(loaded, mean_resizing=False)
            model.save_pretrained(path)
        paths.append(str(path))
    return paths[0], paths[1]


def start_server(model: str, log: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "float32",
               "--max-model-len", "256", "--max-logprobs", "-1", "--kv-cache-memory-bytes", str(2**30),
               "--middleware", "starlette.middleware.gzip.GZipMiddleware", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(900):
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return process, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(2)
    raise RuntimeError("the server did not come up")


def step_seconds(student: str, teacher: str, placement, prompts: int, new_tokens: int, steps: int) -> dict:
    """Seconds per training step (after one warm-up) and the teacher's wire bytes per response token."""
    import lightning as L

    from opdlab.data import PromptDataModule
    from opdlab.divergences import SampledTokenOPD
    from opdlab.module import OPDModule
    from opdlab.selectors import TeachabilitySelector
    from opdlab.tasks import JsonlPrompts

    module = OPDModule(student=student, teacher=teacher, teacher_placement=placement, divergence=SampledTokenOPD(),
                       selector=TeachabilitySelector(ratio=0.05, top_k=16),
                       rollout={"max_new_tokens": new_tokens, "max_prompt_len": 16}, memory={"chunk_size": 64})
    times, metrics = [], []

    class Clock(L.Callback):
        def on_train_batch_start(self, *a):
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, *a):
            times.append(time.perf_counter() - self.t)
            metrics.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("teacher/", "time/"))})

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "p.jsonl"
        data.write_text("".join(json.dumps({"prompt": " ".join(f"w{3 + (i * 7 + j) % 500}" for j in range(8)), "answer": "x"}) + "\n"
                                for i in range(prompts * (steps + 1) + 8)))
        trainer = L.Trainer(max_steps=steps + 1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, callbacks=[Clock()], log_every_n_steps=1)
        trainer.fit(module, datamodule=PromptDataModule(JsonlPrompts(str(data), num_eval=8), batch_size=prompts))
    timed = times[1:]
    return {"s_per_step": sum(timed) / len(timed), "steps": len(timed), "metrics": metrics[-1] if metrics else {}}


def wire_bytes(url: str, name: str, ids: list[list[int]], k) -> dict:
    """Bytes per response token of one request: gzip on the wire, and the JSON it unpacks to."""
    from opdlab.teachers.http import JsonClient

    client = JsonClient(url, 3600)
    body = {"model": name, "prompt": ids, "max_tokens": 0, "echo": True, "prompt_logprobs": -1 if k == "full" else k}
    started = time.perf_counter()
    reply = client.call("POST", "/completions", body)
    seconds = time.perf_counter() - started
    tokens = sum(len(x) - 1 for x in ids)
    raw = len(json.dumps(reply.body, separators=(", ", ": ")).encode())  # as vLLM writes it (close to; checked below)
    return {"k": k, "tokens": tokens, "gzip_bytes_per_token": reply.wire_bytes / tokens, "json_bytes_per_token": raw / tokens,
            "request_s_per_token": seconds / tokens}


def cost(args) -> dict:
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        student, teacher = random_models(args.vocab, Path(tmp))
        vocab = len(AutoTokenizer.from_pretrained(student))
        process, url = start_server(teacher, Path(tmp) / "server.log")
        try:
            from opdlab.teachers import VLLMServerTeacher

            name = teacher
            gen = torch.Generator().manual_seed(0)
            ids = [torch.randint(3, args.vocab, (args.new_tokens + 8,), generator=gen).tolist() for _ in range(args.prompts)]
            # the whole vocabulary is ~V JSON entries per position (~10 MB at V = 151,936): 3 positions are enough
            wire = [wire_bytes(url, name, [ids[0][:4]] if k == "full" else ids, k) for k in (20, 64, "full")]
            for row in wire:
                print("wire", json.dumps(row), flush=True)
            steps = {}
            for label, target, placement in [("local", teacher, None), ("top20", url, VLLMServerTeacher(top_logprobs=20)),
                                             ("top64", url, VLLMServerTeacher(top_logprobs=64))][: 3 if args.steps else 0]:
                try:
                    steps[label] = step_seconds(student, target, placement, args.prompts, args.new_tokens, args.steps)
                except Exception as err:  # noqa: BLE001 - recorded, so the wire numbers are not lost
                    steps[label] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                print(f"step {label}", json.dumps(steps[label]), flush=True)
        finally:
            os.killpg(process.pid, 9)
    return {"vocab": vocab, "prompts": args.prompts, "new_tokens": args.new_tokens, "threads": args.threads,
            "wire": wire, "steps": steps, "note": "the whole vocabulary measured on one sequence of 4 tokens (3 scored "
            "positions: its JSON is ~V entries per position); steps with the local teacher and top-k servers on the same "
            "random models, TA-OPD 5% with the sampled-token loss, one warm-up step not timed"}


# --------------------------------------------------------------------------------------------- report
LEARN = [  # (condition folder, what it is, the condition it is compared with)
    ("local_rkl", "local teacher, reverse KL (the config's loss)", None),
    ("served_full_rkl", "vLLM server, whole vocabulary, reverse KL", "local_rkl"),
    ("served_full_fkl", "vLLM server, whole vocabulary, forward KL", None),
    ("served_top8_fkl", "vLLM server, top-8 log-probs, forward KL (tail bucket)", "served_full_fkl"),
    ("served_top4_fkl", "vLLM server, top-4 log-probs, forward KL (tail bucket)", "served_full_fkl"),
]


def finals(folder: Path) -> dict[str, dict[int, tuple[float, float]]]:
    """method -> seed -> (final accuracy, mean accuracy over the validations after step 0)."""
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for path in sorted(folder.glob("runs/*/seed*/summary.json")):
        summary = json.loads(path.read_text())
        later = [v["accuracy"] for v in summary["validations"] if v["step"] > 0]
        out.setdefault(path.parent.parent.name, {})[int(path.parent.name[4:])] = (summary["accuracy_after"],
                                                                                sum(later) / max(len(later), 1))
    return out


def mean_sd(values: list[float]) -> str:
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else float("nan")
    return f"{m:.3f} ± {sd:.3f}"


def learning_table(root: Path) -> list[str]:
    runs = {name: finals(root / name) for name, _, _ in LEARN if (root / name).is_dir()}
    lines = ["| condition | method | final accuracy (mean ± sd) | mean accuracy over validations | seeds | "
             "paired Δ final vs | Δ (mean, per seed) |", "|---|---|---|---|---|---|---|"]
    for name, label, versus in LEARN:
        for method, seeds in sorted(runs.get(name, {}).items()):
            final = [seeds[s][0] for s in sorted(seeds)]
            curve = [seeds[s][1] for s in sorted(seeds)]
            delta, per_seed = "", ""
            base = runs.get(versus or "", {}).get(method)
            if base:
                common = sorted(set(seeds) & set(base))
                diffs = [seeds[s][0] - base[s][0] for s in common]
                delta = versus
                per_seed = f"{sum(diffs) / len(diffs):+.3f} ({', '.join(f'{d:+.3f}' for d in diffs)})"
            lines.append(f"| {label} | {method} | {mean_sd(final)} | {mean_sd(curve)} | {len(final)} | {delta} | {per_seed} |")
    return lines


def report(args) -> None:
    root = Path(args.root)
    parts = ["# A teacher on a vLLM server, against the local teacher (issue 27)", "",
             "Generated by `python benchmarks/served_teacher.py report`; every number below comes from the files beside "
             "this one (commands in each section). CPU, 2 cores, shared with the other runs of the session.", ""]
    for toy in ("add3", "mix4"):
        path = root / f"accuracy_{toy}.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        parts += [f"## Approximation on {toy} (K = {result['selector_top_k']}, {result['prompts']} prompts, one rollout "
                  "batch scored by both)", "", f"`{result['command']}`", "",
                  "| k | max abs error, teacher log-prob | C: mean / max abs error of the lower bound | C bounds hold (±1e-4) | "
                  "mean upper - lower | D: mean / p95 abs error (mean D) | Jaccard of TA-OPD's 5% keep vs local |",
                  "|---|---|---|---|---|---|---|"]
        for k, r in result["rows"].items():
            parts.append(f"| {k} | {r['teacher_logp_max_abs_error']:.1e} | {r['C_mean_abs_error']:.1e} / "
                         f"{r['C_max_abs_error']:.1e} | {r['C_bounds_hold']} | {r['C_mean_bound_gap']:.1e} | "
                         f"{r['D_mean_abs_error']:.1e} / {r['D_p95_abs_error']:.1e} ({r['D_mean']:.3f}) | "
                         f"{r['jaccard_kept_5pct']:.3f} ({r['kept']} of {r['valid']} kept) |")
        parts.append("")
    learn = root / "add3"
    if learn.is_dir():
        parts += ["## Learning on add3 (200 steps, 3 seeds, TA-OPD at 5% and full OPD)", "",
                  "`opdlab compare --fit_config [configs/ta_opd.yaml] --selectors [full,teachability] --seeds [0,1,2] "
                  "--steps 200 --val_check_interval 50 --jobs 2 --threads 1 --out_dir benchmarks/results/served_teacher/"
                  "add3/<condition> --extra_args [<the condition's --model.teacher ... options>]` (the exact commands: "
                  "`<condition>/runs/*/seed*/config.yaml`).", "", *learning_table(learn), ""]
    cost_path = root / "cost.json"
    if cost_path.is_file():
        c = json.loads(cost_path.read_text())
        parts += [f"## Cost at a {c['vocab']:,}-token vocabulary (random weights; {c['prompts']} prompts x "
                  f"{c['new_tokens']} new tokens, {c['threads']} torch thread(s))", "", f"`{c['command']}`", "",
                  "| k | JSON bytes per response token | with gzip | server seconds per token (one request) |",
                  "|---|---|---|---|"]
        for w in c["wire"]:
            parts.append(f"| {w['k']} | {w['json_bytes_per_token']:,.0f} | {w['gzip_bytes_per_token']:,.0f} | "
                         f"{w['request_s_per_token']:.4f} |")
        timed = {name: row for name, row in c["steps"].items() if "s_per_step" in row}
        parts += ["", "| teacher | seconds per training step | ratio to local | wire bytes per token (gzip) |",
                  "|---|---|---|---|"] if "local" in timed else ["", "Seconds per training step: not measured in this "
                                                                  f"run ({c['steps'] or 'steps 0'})."]
        local = timed.get("local", {}).get("s_per_step")
        for name, row in timed.items() if local else ():
            wire = row["metrics"].get("teacher/wire_bytes_per_token")
            parts.append(f"| {name} | {row['s_per_step']:.2f} | {row['s_per_step'] / local:.2f} | "
                         f"{'' if wire is None else f'{wire:,.0f}'} |")
        parts += ["", c["note"], ""]
    (root.parent / "served_teacher.md").write_text("\n".join(parts).rstrip() + "\n")
    print(f"written {root.parent / 'served_teacher.md'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    acc = sub.add_parser("accuracy", help="top-k approximation against the local teacher on a toy")
    acc.add_argument("--toy", choices=sorted(TOYS), required=True)
    acc.add_argument("--url", required=True, help="a server of the toy's teacher, started with --max-logprobs -1")
    acc.add_argument("--prompts", type=int, default=256)
    acc.add_argument("--out", help="write the JSON result here")
    cst = sub.add_parser("cost", help="wire bytes and step seconds at a large vocabulary (random weights)")
    cst.add_argument("--vocab", type=int, default=151_936)
    cst.add_argument("--prompts", type=int, default=8)
    cst.add_argument("--new_tokens", type=int, default=64)
    cst.add_argument("--steps", type=int, default=2, help="timed training steps per teacher (0: only the wire)")
    cst.add_argument("--threads", type=int, default=2)
    cst.add_argument("--out", help="write the JSON result here")
    rep = sub.add_parser("report", help="benchmarks/results/served_teacher.md from the results in --root")
    rep.add_argument("--root", default="benchmarks/results/served_teacher")
    args = parser.parse_args()
    if args.command == "report":
        report(args)
        return
    started = time.time()
    result = accuracy(args) if args.command == "accuracy" else cost(args)
    result.update(command="python benchmarks/served_teacher.py " + " ".join(sys.argv[1:]),
                  seconds=round(time.time() - started, 1), torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d %H:%M:%S"))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
