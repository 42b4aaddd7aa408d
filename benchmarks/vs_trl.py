"""opdlab vs TRL's GKD trainer: the same on-policy JSD distillation step, tokens/s and peak memory.

Needs `trl` (with `accelerate` and `datasets`); prints a skip message and exits 0 without it. Keep trl
out of the main environment (it is large): a side venv that sees the main one works, e.g.

    python -m venv /tmp/trlvenv
    echo "import site; site.addsitedir('$(python -c 'import site; print(site.getsitepackages()[0])')')" \
        > /tmp/trlvenv/lib/python3.11/site-packages/main_venv.pth   # run with the main venv active
    /tmp/trlvenv/bin/pip install trl accelerate datasets           # torch etc. are found, not reinstalled
    /tmp/trlvenv/bin/python benchmarks/vs_trl.py

Both sides get the same student, teacher, prompts, batch, response length, sampling (temperature 1,
no top-k/top-p), optimizer (AdamW, lr 1e-4, the fused implementation: TRL's default `optim` is
`adamw_torch_fused`; runs before 2026-11-28 02:30 gave opdlab the slower for-loop AdamW) and loss: TRL `GKDTrainer(lmbda=1, beta)` (student
rollouts every step, `generalized_jsd_loss` on full logits) vs `OPDModule(FullSelector(),
GeneralizedJSD(beta))` (at ratio 1 the module scores and takes the loss from one projection per chunk).
Each run is a fresh subprocess; the two alternate for `--rounds` rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

from report import publish


def has_trl() -> bool:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        import trl  # noqa: F401
        from trl.experimental.gkd import GKDTrainer  # noqa: F401
    except ImportError:
        return False
    return True


def peak_mb_since_reset() -> float:
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return (int(status["VmHWM"].split()[0]) - int(status["VmRSS"].split()[0])) / 1024


def reset_peak() -> float:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmRSS"].split()[0]) / 1024


def rss_peak_mb() -> float:
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmHWM"].split()[0]) / 1024


def build_random_pair(vocab: int, directory: str) -> tuple[str, str]:
    """Random-init Qwen2 student (h256/L2) and teacher (h512/L2) with `vocab` logits, saved with the char
    tokenizer: a realistic vocabulary without a download (token ids past the tokenizer are just ids)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from opdlab.toy import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    paths = []
    for name, hidden, seed in (("student", 256, 1), ("teacher", 512, 2)):
        torch.manual_seed(seed)
        config = Qwen2Config(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, intermediate_size=2 * hidden,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        path = os.path.join(directory, name)
        Qwen2ForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def prompts(args) -> list[str]:
    from opdlab.tasks import AdditionTask

    task = AdditionTask(digits=args.digits)
    return [task.problem_at(i).prompt for i in range(args.batch_size * (args.steps + args.warmup))]


def run_trl(args) -> dict:
    """TRL GKDTrainer, fully on-policy (lmbda=1): per-step wall time and response tokens."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from opdlab.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(args.student)
    student, teacher = load_causal_lm(args.student), load_causal_lm(args.teacher)
    steps, tokens = [], []

    class CountingGKD(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            tokens.append(int((inputs["labels"] != -100).sum()))
            # The Trainer counts num_items_in_batch on the collated prompt-only labels (all -100 here: the
            # completions are generated later), which would divide by 0; use GKD's own token mean instead.
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch=None)

    def collate(rows):
        enc = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True, add_special_tokens=True)
        return {"prompts": enc["input_ids"], "prompt_attention_mask": enc["attention_mask"],
                "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.full_like(enc["input_ids"], -100)}

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **kw):
            steps.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as out:
        config = GKDConfig(
            output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps + args.warmup,
            learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            adam_beta1=0.9, adam_beta2=0.98, lmbda=1.0, beta=args.beta, temperature=1.0,
            max_new_tokens=args.max_new_tokens, report_to="none", save_strategy="no", logging_steps=10**6,
            use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0, max_length=None,
        )
        trainer = CountingGKD(
            model=student, teacher_model=teacher, args=config, data_collator=collate,
            train_dataset=Dataset.from_list([{"prompt": p} for p in prompts(args)]), processing_class=tokenizer,
            callbacks=[Clock()],
        )
        base = reset_peak()
        trainer.train()
    return {"steps": steps[args.warmup :], "tokens": tokens[args.warmup :], "peak_mb": rss_peak_mb() - base}


def run_opdlab(args) -> dict:
    import lightning as L
    import torch

    from opdlab.data import PromptDataModule
    from opdlab.divergences import GeneralizedJSD
    from opdlab.module import OPDModule
    from opdlab.selectors import FullSelector
    from opdlab.tasks import AdditionTask

    steps, tokens, stages = [], [], []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, module, *a):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, *a):
            steps.append(time.perf_counter() - self.start)
            tokens.append(int(outputs["record"].rollout.response_mask.sum()))
            stages.append(dict(outputs["record"].seconds))  # the time/* breakdown

    module = OPDModule(
        student=args.student,
        teacher=args.teacher,
        selector=FullSelector(),
        divergence=GeneralizedJSD(beta=args.beta),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), weight_decay=0.0, fused=True),
        rollout=dict(max_new_tokens=args.max_new_tokens),
    )
    module.configure_model()
    trainer = L.Trainer(
        max_steps=args.steps + args.warmup, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[Clock()],
    )
    base = reset_peak()
    trainer.fit(module, datamodule=PromptDataModule(AdditionTask(digits=args.digits), batch_size=args.batch_size))
    return {"steps": steps[args.warmup :], "tokens": tokens[args.warmup :], "peak_mb": rss_peak_mb() - base,
            "stages": stages[args.warmup :]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", default="toy:add3/student")
    p.add_argument("--teacher", default="toy:add3/teacher")
    p.add_argument("--digits", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--beta", type=float, default=0.5, help="JSD beta (TRL semantics) on both sides")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vocab", type=int, default=0,
                   help="instead of the toy models, random-init Qwen2 models with this many logits (e.g. 151936)")
    p.add_argument("--output", help="append the markdown result here")
    p.add_argument("--worker", choices=["trl", "opdlab"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if not has_trl():
        print("vs_trl: skipped: `trl` is not importable (pip install trl accelerate datasets, ideally in a side "
              "venv; see this file's docstring).")
        return
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.worker:
        print(json.dumps((run_trl if args.worker == "trl" else run_opdlab)(args)))
        return
    tmp = tempfile.TemporaryDirectory()
    if args.vocab:
        args.student, args.teacher = build_random_pair(args.vocab, tmp.name)
    results = {"trl": [], "opdlab": []}
    for rnd in range(args.rounds):
        for name in (["trl", "opdlab"] if rnd % 2 == 0 else ["opdlab", "trl"]):
            cmd = [sys.executable, __file__, "--worker", name, "--student", args.student, "--teacher", args.teacher]
            cmd += [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in
                    ("digits", "batch-size", "max-new-tokens", "beta", "steps", "warmup", "threads")]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"{name} failed:\n{out.stderr[-4000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[name].append(r)
            print(f"# round {rnd + 1} {name:>6}: {statistics.median(r['steps']):.3f} s/step, "
                  f"{r['peak_mb']:.0f} MB peak", flush=True)
    rows = {}
    for name, runs in results.items():
        steps = [s for r in runs for s in r["steps"]]
        tok_s = [t / s for r in runs for t, s in zip(r["tokens"], r["steps"])]
        rows[name] = (statistics.median(tok_s), statistics.median(steps), statistics.median(r["peak_mb"] for r in runs),
                      statistics.median(t for r in runs for t in r["tokens"]))
    lines = ["| trainer | response tok/s | step s | peak RSS delta MB | response tokens/step |", "|---|---|---|---|---|"]
    for name, (tok_s, step, mb, toks) in rows.items():
        lines.append(f"| {name} | {tok_s:,.1f} | {step:.3f} | {mb:,.0f} | {toks:.0f} |")
    lines.append(f"\nopdlab / TRL throughput: {rows['opdlab'][0] / rows['trl'][0]:.2f}x; "
                 f"TRL / opdlab peak memory: {rows['trl'][2] / max(rows['opdlab'][2], 1e-9):.2f}x.")
    stages = [s for r in results["opdlab"] for s in r["stages"]]
    if stages:
        med = {k: statistics.median(s.get(k, 0.0) for s in stages) for k in stages[0]}
        lines.append("opdlab step breakdown (median s): "
                     + ", ".join(f"{k} {v:.3f} ({v / rows['opdlab'][1]:.0%})" for k, v in med.items()) + ".")
    import trl

    tmp.cleanup()
    publish("vs_trl",
            f"{platform.node()}, {os.cpu_count()} CPU threads (torch uses {args.threads}), "
            f"torch {torch.__version__}, trl {trl.__version__}.",
            f"{f'random Qwen2 h256/L2 <- h512/L2, vocab {args.vocab:,}' if args.vocab else f'{args.student} <- {args.teacher}'}"
            f", {args.batch_size} prompts/step, max_new_tokens {args.max_new_tokens}, "
            f"JSD beta {args.beta}; medians over {args.rounds} rounds x {args.steps} steps (after {args.warmup} "
            "warm-up steps), each run in a fresh process.\n",
            "\n".join(lines), args.output)


if __name__ == "__main__":
    main()
