"""`opdlab diagnose`: the paper's fixed-context diagnostic (docs/method.md §3) as one command.

    opdlab diagnose --config configs/diagnose/add3.yaml            # toy add3, short full-OPD run
    opdlab diagnose --config configs/diagnose/spell2.yaml          # the second toy (spelled addition)
    opdlab diagnose --student_after runs/ta_opd/first/student  # score a trained student instead

1. Freeze a bank of student-generated contexts: `bank.contexts` prompts, one response each sampled by
   the initial student θ0, cut at `bank.max_response_tokens` tokens (saved as bank.pt; `--bank.path`
   reuses it, so several θ1 can be compared on the same contexts).
2. Score every response position with θ0: D, C, H (top-K features), D^L = D̃·C̃ and D^I = D̃·(1 - C̃)
   (normalised over the whole bank as the selectors normalise a batch), teacher entropy, position, and
   the full-vocabulary forward and reverse KLs.
3. Get θ1: load `--student_after`, or train θ0 for `train.steps` OPD steps (OPDModule + a Lightning
   Trainer; full-token OPD by default, so θ1 is not trained to favour any predictor).
4. Re-score the same contexts with θ1; per position, gain G = (KL^base - KL^after) / KL^base for the
   forward KL (G_f, the paper's) and the reverse KL (G_r). Positions with KL^base < `min_base_kl` are kept
   in the bank but left out of the statistics (G is ill-defined where the student already matches).
5. Statistics (opdlab.diagnostics.stats) and plots into `out_dir`: bank.csv (bank.parquet too when
   pyarrow is installed), summary.json, deciles.png, terciles.png, coefficients.png.
"""

from __future__ import annotations

import functools
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from opdlab.chunks import SCORE_CHUNK_ROWS
from opdlab.diagnostics.bank import (
    BankOptions,
    bank_counts,
    bank_table,
    load_bank,
    sample_bank,
    save_bank,
    score_bank,
    write_bank,
)
from opdlab.diagnostics.report import (
    StatsOptions,
    format_report,
    gain_statistics,
    sign_disagreements,
    to_jsonable,
    write_plots,
)
from opdlab.diagnostics.probe import replace_student
from opdlab.divergences import Divergence, ReverseKL
from opdlab.engines import SamplingParams
from opdlab.evaluation import greedy_accuracy
from opdlab.options import MemoryOptions, RolloutOptions, TrainingOptions
from opdlab.selectors import FullSelector, TokenSelector
from opdlab.tasks import AdditionTask, PromptSource


@dataclass
class DiagnosticTraining:
    """The short OPD run that turns θ0 into θ1 (skipped when --student_after is given).

    Args:
        selector: positions that get the loss (default: all, full-token OPD). Class name or path,
            e.g. `TeachabilitySelector` with `--train.selector.ratio 0.05`.
        divergence: per-token loss at kept positions (default: ReverseKL, as configs/ta_opd.yaml).
        steps: optimizer steps.
        lr: AdamW learning rate (weight decay 0, betas (0.9, 0.98)).
        batch_size: prompts per step.
        num_samples: responses per prompt.
        max_new_tokens: rollout length limit of training.
        temperature: rollout temperature of training.
        loss_normalization: `kept` or `valid` (see opdlab.step.loss_scale).
        seed: seed of training rollouts and of random selection.
        accelerator: Lightning accelerator (`auto`, `cpu`, `gpu`).
    """

    selector: TokenSelector | None = None
    divergence: Divergence | None = None
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 128
    num_samples: int = 1
    max_new_tokens: int = 16
    temperature: float = 1.0
    loss_normalization: str = "kept"
    seed: int = 0
    accelerator: str = "auto"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "num_samples", "max_new_tokens"):
            if getattr(self, name) < 1:  # steps -1 would be Lightning's "no limit": a run that never ends
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or not self.temperature > 0:
            raise ValueError(f"train.lr and train.temperature must be > 0, got {self.lr} and {self.temperature}")


# --------------------------------------------------------------------------------------------- θ1
def train_student(module, source: PromptSource, opts: DiagnosticTraining) -> dict:
    """Train the module's student in place for `opts.steps` OPD steps; returns what was run."""
    import lightning as L

    from opdlab.data import PromptDataModule
    from opdlab.console import silence_lightning_noise

    silence_lightning_noise()
    module.student.train()
    from opdlab.callbacks.progress import StepProgressBar

    trainer = L.Trainer(
        max_steps=opts.steps, accelerator=opts.accelerator, devices=1, logger=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, inference_mode=False,
        callbacks=[StepProgressBar()],  # steps out of `steps` (Lightning's own bar shows "Epoch 0/-2")
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=PromptDataModule(source, batch_size=opts.batch_size))
    return {"steps": trainer.global_step, "seconds": round(time.perf_counter() - started, 1)}


@torch.no_grad()
def student_accuracy(module, source: PromptSource, max_new_tokens: int, batch_size: int = 256) -> float:
    """Greedy accuracy of the module's student on the source's held-out problems."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    return greedy_accuracy(lambda prompts: module.generate(prompts, params), module.tokenizer, source, batch_size)


# --------------------------------------------------------------------------------------------- the command
def diagnose(
    teacher: str = "toy:add3/teacher",
    student: str = "toy:add3/student",
    source: PromptSource | None = None,
    student_after: str | None = None,
    out_dir: str = "runs/diagnose/add3",
    bank: BankOptions = BankOptions(),
    train: DiagnosticTraining = DiagnosticTraining(),
    stats: StatsOptions = StatsOptions(),
    evaluate: bool = True,
    save_student: bool = True,
    student_dtype: str = "float32",
    teacher_dtype: str = "float32",
    chunk_size: int = SCORE_CHUNK_ROWS,
) -> dict:
    """The fixed-context diagnostic: does a token's θ0 teachability predict how much OPD improves it?

    Args:
        teacher: teacher checkpoint: local directory, hub id, or `toy:<name>/teacher` (as in fit configs), or the URL
            of a vLLM server of it (asked for its whole vocabulary: start it with --max-logprobs -1).
        student: the initial student θ0, same forms.
        source: prompts of the bank and of the training run, e.g. `opdlab.tasks.AdditionTask` (default,
            3 digits) or `opdlab.tasks.SpelledAdditionTask`; any PromptSource.
        student_after: a trained student θ1 (an HF checkpoint such as the `student/` that `opdlab fit`
            exports into its log dir). When omitted, θ1 comes from a short OPD run (see `train`).
        out_dir: where the bank, summary.json and the plots go (created; existing files are replaced).
        bank: the frozen contexts.
        train: the OPD run that produces θ1.
        stats: the statistics.
        evaluate: report θ0's and θ1's greedy accuracy on the source's held-out problems.
        save_student: save θ1 of a training run to `out_dir/student_after`.
        student_dtype: student weight dtype (float32, bfloat16, float16).
        teacher_dtype: teacher weight dtype.
        chunk_size: response rows whose logits the scoring pass materialises at once.
    """
    from opdlab.models import load_tokenizer
    from opdlab.module import OPDModule
    from opdlab.runs import writable_folder

    source = source if source is not None else AdditionTask(digits=3)
    if bank.path and not Path(bank.path).is_file():
        raise FileNotFoundError(f"bank.path {bank.path} does not exist; pass the bank.pt an earlier diagnose wrote "
                                "(in its --out_dir), or leave bank.path unset to sample a new bank")
    loaded = load_bank(bank.path) if bank.path else None  # read before any model loads: a wrong file is refused first
    vocabulary = len(load_tokenizer(student))  # checked before any weights load
    if bank.top_k > vocabulary:
        raise ValueError(f"bank.top_k={bank.top_k} exceeds the vocabulary ({vocabulary} tokens of {student}); use "
                         f"--bank.top_k <= {vocabulary}")
    out = writable_folder(out_dir, "--out_dir")
    from opdlab.plugins import default_placement

    # the diagnostic's full-vocabulary KLs need the teacher's whole distribution (a vLLM server: --max-logprobs -1)
    placement = default_placement(teacher, need="full")
    module = OPDModule(
        student=student, teacher=teacher, teacher_placement=placement, selector=train.selector or FullSelector(),
        divergence=train.divergence or ReverseKL(),
        optimizer=functools.partial(torch.optim.AdamW, lr=train.lr, weight_decay=0.0, betas=(0.9, 0.98)),
        rollout=RolloutOptions(num_samples=train.num_samples, max_new_tokens=train.max_new_tokens,
                               temperature=train.temperature),
        memory=MemoryOptions(chunk_size=chunk_size, student_dtype=student_dtype, teacher_dtype=teacher_dtype),
        training=TrainingOptions(loss_normalization=train.loss_normalization, seed=train.seed),
    )
    module.configure_model()
    device = pick_device(train.accelerator)
    module.to(device)
    started = time.perf_counter()
    parts = loaded if loaded is not None else sample_bank(module, source, bank, device)
    save_bank(parts, out / "bank.pt")
    base = score_bank(module, parts, bank.top_k, device, "scoring θ0")
    accuracy = {"before": student_accuracy(module, source, train.max_new_tokens)} if evaluate else {}
    if student_after:
        replace_student(module, student_after)
        theta1 = {"student_after": student_after}
    else:
        theta1 = {"trained": train_student(module, source, train), "selector": type(module.selector).__name__,
                  "selector_ratio": module.selector.ratio, "divergence": type(module.divergence).__name__}
        module.to(device)  # Lightning's teardown may have moved it
        if save_student:
            module.export_student(str(out / "student_after"))
    if evaluate:
        accuracy["after"] = student_accuracy(module, source, train.max_new_tokens)
    after = score_bank(module, parts, bank.top_k, device, "scoring θ1")
    table = bank_table(base, after, module.tokenizer, stats.normalization, stats.min_base_kl)
    written = write_bank(table, out)
    result = gain_statistics(table, stats)
    written += write_plots(result, out, label=f"{student} -> θ1")
    counts = bank_counts(table)
    summary = {
        "out_dir": str(out),
        "teacher": teacher, "student": student, "source": type(source).__name__, "theta1": theta1,
        "accuracy": accuracy, "bank": asdict(bank) | {"path": bank.path}, "train": train_summary(train),
        "stats": asdict(stats), "counts": counts, "seconds": round(time.perf_counter() - started, 1),
        "machine": f"{platform.node()} {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "files": ["bank.pt", *written, "summary.json"],
        "headline": "terciles and tercile_differences (plain mean G, docs/method.md §3); their *_winsorized twins "
                    "are robustness checks",
        "sign_disagreements": to_jsonable(sign_disagreements(result)),
        **to_jsonable(result),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_report(result, counts))
    if accuracy:
        print(f"student accuracy: θ0 {accuracy['before']:.1%} -> θ1 {accuracy['after']:.1%}")
    print(f"diagnostic written to {out}: {', '.join(summary['files'])}")
    return summary


def train_summary(train: DiagnosticTraining) -> dict:
    out = {k: v for k, v in asdict(train).items() if k not in ("selector", "divergence")}
    out["selector"] = type(train.selector).__name__ if train.selector else "FullSelector"
    out["divergence"] = type(train.divergence).__name__ if train.divergence else "ReverseKL"
    return out


def pick_device(accelerator: str) -> torch.device:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def run_diagnose(argv: list[str]) -> None:
    """`opdlab diagnose ...`: jsonargparse turns `diagnose`'s signature and docstrings into --help."""
    from jsonargparse import CLI

    from opdlab import plugins
    from opdlab.console import one_line_parser_class

    argv = plugins.expand_short_names(argv, {"--train.selector": "opdlab.selectors",
                                             "--train.divergence": "opdlab.divergences"})
    summary = CLI(diagnose, args=argv, prog="opdlab diagnose", parser_class=one_line_parser_class())
    if isinstance(summary, dict):  # record the command line (not known inside `diagnose`)
        path = Path(summary["out_dir"]) / "summary.json"
        path.write_text(json.dumps({"command": "opdlab diagnose " + " ".join(argv), **summary}, indent=2))
