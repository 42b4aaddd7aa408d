"""Response tokens per second of a full OPD training step on the toy models, with the time breakdown.

    python benchmarks/step_throughput.py                   # toy:add3, batch 128, full vs teachability@0.05
    python benchmarks/step_throughput.py --threads 1 --rounds 20 --batch-size 256

Each method is an `OPDModule` driven by its own Lightning `Trainer` (the real training step: rollout,
forward, scoring, selection, loss + backward, optimizer step). Methods run in one process, interleaved:
round r runs `--steps` steps of each method in turn (rotating the order), after `--warmup` untimed
steps each. Per-stage seconds come from the step's `StepRecord.seconds` (the `time/*` metrics); the step
total is measured around `training_step` by a callback. Medians over all timed steps are reported.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import lightning as L
import torch
from report import publish

from opdlab.data import PromptDataModule
from opdlab.divergences import ReverseKL, SampledTokenOPD
from opdlab.module import OPDModule
from opdlab.plugins import discover
from opdlab.selectors import FullSelector, TeachabilitySelector
from opdlab.tasks import AdditionTask

STAGES = ("rollout", "forward", "score", "select", "loss", "optimizer")
METHODS = {
    "full": lambda: FullSelector(),
    "teachability@0.05": lambda: TeachabilitySelector(ratio=0.05, top_k=8),
}
DIVERGENCES = {"reverse_kl": ReverseKL, "sampled_token": SampledTokenOPD}


class StepClock(L.Callback):
    """Wall time of every training step and the module's per-stage seconds."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = outputs["record"]  # the StepRecord the training step returned
        record = dict(step.seconds)
        record["step"] = time.perf_counter() - self.start
        record["tokens"] = int(step.rollout.response_mask.sum())
        record["kept"] = int(step.keep.sum())
        self.records.append(record)


def run_steps(module: OPDModule, datamodule: PromptDataModule, steps: int) -> list[dict]:
    clock = StepClock()
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[clock],
    )
    trainer.fit(module, datamodule=datamodule)
    return clock.records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", default="toy:add3/student")
    p.add_argument("--teacher", default="toy:add3/teacher")
    p.add_argument("--digits", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--divergence", default="reverse_kl", choices=list(DIVERGENCES))
    p.add_argument("--rollout-engine", default="static", choices=["static", "reference"],
                   help="the module's rollout engine (model.rollout_engine)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per method per round")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--output", help="append the markdown result here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*max_steps.*")
    L.seed_everything(0, verbose=False)

    modules, data = {}, {}
    for name, make_selector in METHODS.items():
        modules[name] = OPDModule(
            student=args.student,
            teacher=args.teacher,
            selector=make_selector(),
            divergence=DIVERGENCES[args.divergence](),
            rollout_engine=discover("rollout_engine")[args.rollout_engine].cls(),
            optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98)),
            rollout=dict(max_new_tokens=args.max_new_tokens),
        )
        data[name] = PromptDataModule(AdditionTask(digits=args.digits), batch_size=args.batch_size)
        run_steps(modules[name], data[name], args.warmup)
    records: dict[str, list[dict]] = {name: [] for name in METHODS}
    names = list(METHODS)
    for rnd in range(args.rounds):
        for name in names[rnd % len(names):] + names[: rnd % len(names)]:
            got = run_steps(modules[name], data[name], args.steps)
            records[name] += got
            print(f"# round {rnd + 1} {name:>18}: {statistics.median(r['step'] for r in got):.3f} s/step", flush=True)

    lines = [
        "| method | response tok/s | step s | " + " | ".join(f"{s} s" for s in STAGES) + " | kept / valid tokens |",
        "|---|---|---|" + "---|" * len(STAGES) + "---|",
    ]
    for name, recs in records.items():
        med = {k: statistics.median(r.get(k, 0.0) for r in recs) for k in (*STAGES, "step", "tokens", "kept")}
        tok_s = statistics.median(r["tokens"] / r["step"] for r in recs)
        lines.append(f"| {name} | {tok_s:,.0f} | {med['step']:.3f} | "
                     + " | ".join(f"{med[s]:.3f} ({100 * med[s] / med['step']:.0f}%)" for s in STAGES)
                     + f" | {med['kept']:.0f} / {med['tokens']:.0f} |")
    full, ta = (statistics.median(r["step"] for r in records[n]) for n in METHODS)
    lines.append(f"\nteachability@0.05 / full step time: {ta / full:.2f}. `loss` includes backward; "
                 "`forward` is the student (with grad) and teacher forwards to final hidden states.")
    publish("step_throughput",
            f"{platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU "
            f"threads (torch uses {torch.get_num_threads()}), torch {torch.__version__}.",
            f"{args.student} <- {args.teacher}, {args.batch_size} prompts/step, max_new_tokens "
            f"{args.max_new_tokens}, {args.divergence}, {args.rollout_engine} rollout engine; medians of {args.rounds} interleaved rounds x "
            f"{args.steps} steps per method (after {args.warmup} warm-up steps).\n",
            "\n".join(lines), args.output)


if __name__ == "__main__":
    main()
