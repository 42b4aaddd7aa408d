"""opdlab vs TRL's distillation trainers: the same on-policy JSD distillation step, tokens/s and peak memory.

    /tmp/trlvenv/bin/python benchmarks/vs_trl.py --vocab 151936 --batch-size 8 --max-new-tokens 64 --steps 2 \
        --warmup 1 --rounds 2 --output benchmarks/results/vs_trl.md

TRL's side is `trl.DistillationTrainer` (TRL >= 1.16, its stable on-policy trainer: HF generate or vLLM, a chunked
divergence that never builds the full logits; always on-policy, `beta` as in GKD: 0 forward KL, 1 reverse KL), or
with `--trl-trainer gkd` the legacy `trl.experimental.gkd.GKDTrainer` (kept as history). Both TRL configs default
to bf16 autocast and gradient checkpointing; they are switched off here, so both sides train in float32 without
recomputation. opdlab runs twice per round: full-token OPD (`FullSelector`, ratio 1) and TA-OPD at 5%.

Peak memory is the RSS high-water mark above the RSS after loading the models and touching every weight
(transformers 5 memory-maps safetensors: untouched weights are paged in during the first step, which would
otherwise count as training memory; results before 2026-12-03 counted them).

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


def has_trl(trainer: str = "distillation") -> bool:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        if trainer == "gkd":
            from trl.experimental.gkd import GKDTrainer  # noqa: F401
        else:
            from trl import DistillationTrainer  # noqa: F401
    except ImportError:
        return False
    return True


def touch(*models) -> None:
    """Read every weight once, so memory-mapped weights are resident before the peak is reset."""
    import torch

    with torch.no_grad():
        for model in models:
            for param in model.parameters():
                param.float().sum()


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


def state_mb(model) -> float:
    """MB of the fp32 gradients and AdamW moments of the trainable parameters (12 B each): memory both
    trainers hold at their peak whatever their loss path does."""
    return 12 * sum(p.numel() for p in model.parameters() if p.requires_grad) / 2**20


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


def run_distillation(args) -> dict:
    """TRL DistillationTrainer (always on-policy): per-step wall time, response tokens and stage times."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from opdlab.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(args.student)
    tokenizer.padding_side = "left"
    student, teacher = load_causal_lm(args.student), load_causal_lm(args.teacher)
    steps, tokens, stages = [], [], []
    current: dict = {}

    class Counting(DistillationTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            tokens.append(int(inputs["completion_mask"].sum()))  # generated tokens scored (EOS included)
            start = time.perf_counter()
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            current["forward+loss"] = time.perf_counter() - start
            return out

        def _generate_single_turn(self, *a, **kw):
            start = time.perf_counter()
            out = super()._generate_single_turn(*a, **kw)
            current["rollout"] = current.get("rollout", 0.0) + time.perf_counter() - start
            return out

        def training_step(self, *a, **kw):  # generate + forward/loss + backward, not the optimizer step
            start = time.perf_counter()
            out = super().training_step(*a, **kw)
            current["training_step"] = time.perf_counter() - start
            return out

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            current.clear()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **kw):
            total = time.perf_counter() - self.start
            steps.append(total)
            rollout, loss = current.get("rollout", 0.0), current.get("forward+loss", 0.0)
            stages.append({"rollout": rollout, "forward+loss": loss,
                           "backward": current.get("training_step", 0.0) - rollout - loss,
                           "optimizer+rest": total - current.get("training_step", 0.0)})

    with tempfile.TemporaryDirectory() as out:
        config = DistillationConfig(
            output_dir=out, use_cpu=True, bf16=False, gradient_checkpointing=False,
            per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
            max_steps=args.steps + args.warmup, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.98, beta=args.beta, temperature=1.0, top_p=1.0, top_k=0,
            max_completion_length=args.max_new_tokens, report_to="none", save_strategy="no", logging_steps=10**6,
            disable_tqdm=True, dataloader_num_workers=0, seed=0, shuffle_dataset=False,
        )
        trainer = Counting(model=student, teacher_model=teacher, args=config, processing_class=tokenizer,
                           train_dataset=Dataset.from_list([{"prompt": p} for p in prompts(args)]), callbacks=[Clock()])
        touch(student, teacher)
        base = reset_peak()
        trainer.train()
    return {"steps": steps[args.warmup :], "tokens": tokens[args.warmup :], "peak_mb": rss_peak_mb() - base,
            "stages": stages[args.warmup :], "dtype": str(torch.get_default_dtype()), "state_mb": state_mb(student)}


def run_gkd(args) -> dict:
    """TRL GKDTrainer (legacy), fully on-policy (lmbda=1): per-step wall time and response tokens."""
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
            bf16=False, gradient_checkpointing=False,  # TRL's defaults: bf16 autocast and recomputation (runs
            # before 2026-12-03 had them: TRL's side was not float32)
        )
        trainer = CountingGKD(
            model=student, teacher_model=teacher, args=config, data_collator=collate,
            train_dataset=Dataset.from_list([{"prompt": p} for p in prompts(args)]), processing_class=tokenizer,
            callbacks=[Clock()],
        )
        touch(student, teacher)
        base = reset_peak()
        trainer.train()
    return {"steps": steps[args.warmup :], "tokens": tokens[args.warmup :], "peak_mb": rss_peak_mb() - base}


def run_opdlab(args, ratio: float = 1.0) -> dict:
    import lightning as L
    import torch

    from opdlab.data import PromptDataModule
    from opdlab.divergences import GeneralizedJSD
    from opdlab.module import OPDModule
    from opdlab.selectors import FullSelector, TeachabilitySelector
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
        selector=FullSelector() if ratio >= 1 else TeachabilitySelector(ratio=ratio, top_k=16),
        divergence=GeneralizedJSD(beta=args.beta),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), weight_decay=0.0, fused=True),
        rollout=dict(max_new_tokens=args.max_new_tokens),
        memory=dict(chunk_size=args.chunk_size) if args.chunk_size else None,
    )
    module.configure_model()
    touch(module.student, module.teacher)
    trainer = L.Trainer(
        max_steps=args.steps + args.warmup, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[Clock()],
    )
    base = reset_peak()
    trainer.fit(module, datamodule=PromptDataModule(AdditionTask(digits=args.digits), batch_size=args.batch_size))
    return {"steps": steps[args.warmup :], "tokens": tokens[args.warmup :], "peak_mb": rss_peak_mb() - base,
            "stages": stages[args.warmup :], "state_mb": state_mb(module.student)}


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
    p.add_argument("--trl-trainer", choices=["distillation", "gkd"], default="distillation",
                   help="TRL's DistillationTrainer (stable, TRL >= 1.16) or the legacy GKDTrainer")
    p.add_argument("--chunk-size", type=int, default=0, help="opdlab's memory.chunk_size (0: its default, 256 rows)")
    p.add_argument("--ta-ratio", type=float, default=0.05, help="the TA-OPD run's budget (0: no TA-OPD run)")
    p.add_argument("--worker", choices=["trl", "opdlab", "opdlab_ta"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if not has_trl(args.trl_trainer):
        print(f"vs_trl: skipped: TRL's {args.trl_trainer} trainer is not importable (pip install 'trl>=1.16' "
              "accelerate datasets, ideally in a side venv; see this file's docstring).")
        return
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.worker:
        run = {"trl": run_distillation if args.trl_trainer == "distillation" else run_gkd,
               "opdlab": run_opdlab, "opdlab_ta": lambda a: run_opdlab(a, a.ta_ratio)}[args.worker]
        print(json.dumps(run(args)))
        return
    tmp = tempfile.TemporaryDirectory()
    if args.vocab:
        args.student, args.teacher = build_random_pair(args.vocab, tmp.name)
    names = ["trl", "opdlab", *(["opdlab_ta"] if args.ta_ratio else [])]
    results = {name: [] for name in names}
    for rnd in range(args.rounds):
        for name in (names if rnd % 2 == 0 else names[::-1]):
            cmd = [sys.executable, __file__, "--worker", name, "--student", args.student, "--teacher", args.teacher]
            cmd += [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in
                    ("digits", "batch-size", "max-new-tokens", "beta", "steps", "warmup", "threads", "trl-trainer",
                     "ta-ratio", "chunk-size")]
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
                      statistics.median(t for r in runs for t in r["tokens"]),
                      statistics.median(r["peak_mb"] - r.get("state_mb", 0.0) for r in runs))
    trl_name = "TRL DistillationTrainer" if args.trl_trainer == "distillation" else "TRL GKDTrainer (legacy)"
    labels = {"trl": trl_name, "opdlab": "opdlab full-token (ratio 1)", "opdlab_ta": f"opdlab TA-OPD {args.ta_ratio:.0%}"}
    lines = ["| trainer | response tok/s | step s | peak RSS above the loaded models, MB | response tokens/step | "
             "tok/s vs TRL | peak memory vs TRL | working memory MB | working memory vs TRL |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, (tok_s, step, mb, toks, working) in rows.items():
        lines.append(f"| {labels[name]} | {tok_s:,.1f} | {step:.3f} | {mb:,.0f} | {toks:.0f} | "
                     f"{tok_s / rows['trl'][0]:.2f}x | {mb / max(rows['trl'][2], 1e-9):.2f}x | {working:,.0f} | "
                     f"{working / max(rows['trl'][4], 1e-9):.2f}x |")
    state = statistics.median(r.get("state_mb", 0.0) for r in results["trl"])
    lines.append(f"\nWorking memory = peak minus the student's fp32 gradients and AdamW moments ({state:,.0f} MB, "
                 "12 B per trainable parameter), which both trainers hold at their peak whatever their loss path does.")
    lines.append("")
    for name in names:
        stages = [s for r in results[name] for s in r.get("stages", [])]
        if stages:
            med = {k: statistics.median(s.get(k, 0.0) for s in stages) for k in stages[0]}
            lines.append(f"{labels[name]} step breakdown (median s): "
                         + ", ".join(f"{k} {v:.3f} ({v / rows[name][1]:.0%})" for k, v in med.items()) + ".")
    import trl

    tmp.cleanup()
    publish("vs_trl",
            f"{platform.node()}, {os.cpu_count()} CPU threads (torch uses {args.threads}), "
            f"torch {torch.__version__}, trl {trl.__version__}.",
            f"{f'random Qwen2 h256/L2 <- h512/L2, vocab {args.vocab:,}' if args.vocab else f'{args.student} <- {args.teacher}'}"
            f", {args.batch_size} prompts/step, max_new_tokens {args.max_new_tokens}, "
            f"JSD beta {args.beta}, float32 on both sides; medians over {args.rounds} rounds x {args.steps} steps "
            f"(after {args.warmup} warm-up steps), each run in a fresh process, the order alternating by round.\n",
            "\n".join(lines), args.output)


if __name__ == "__main__":
    main()
