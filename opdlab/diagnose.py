"""`opdlab diagnose`: the paper's fixed-context diagnostic (DESIGN.md §3) as one command.

    opdlab diagnose --config configs/diagnose.yaml                 # toy add3, short full-OPD run
    opdlab diagnose --student_after runs/ta_opd/version_0/student  # score a trained student instead

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
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from opdlab.diagnostics import plots
from opdlab.diagnostics.stats import bootstrap_tercile_gap, decile_means, standardized_ols, winsorize
from opdlab.divergences import Divergence, ReverseKL
from opdlab.rollout import Rollout, decode_responses, encode_prompts, sample_rollouts
from opdlab.scoring import compute_token_stats
from opdlab.selectors import FullSelector, TokenSelector
from opdlab.selectors.base import Normalization, normalize_scores
from opdlab.tasks import AdditionTask, PromptSource

PREDICTORS = ["D", "H", "C", "D_L", "D_I"]
RAW_MODEL = ["H", "D", "HxD", "C", "position", "teacher_entropy"]
TEACHABILITY_MODEL = ["H", "D_L", "D_I", "position", "teacher_entropy"]
GAINS = {"forward": "gain_f", "reverse": "gain_r"}


@dataclass
class BankOptions:
    """The frozen bank of student-generated contexts.

    Args:
        contexts: number of contexts (prompts, one sampled student response each); the paper used 300.
        max_response_tokens: response tokens kept per context (the paper: the first 192).
        top_k: K of the student/teacher top-K sets behind C, D and H.
        temperature: sampling temperature of the bank's responses.
        seed: seed of the responses' sampling (one generator per prompt).
        prompt_offset: stream index of the first bank prompt in the source's training stream (far from
            the prompts a short training run consumes).
        batch_size: contexts sampled and scored at once.
        path: reuse this saved bank (bank.pt of an earlier run) instead of sampling a new one.
    """

    contexts: int = 300
    max_response_tokens: int = 192
    top_k: int = 16
    temperature: float = 1.0
    seed: int = 0
    prompt_offset: int = 1_000_000
    batch_size: int = 64
    path: str | None = None


@dataclass
class TrainOptions:
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
        loss_normalization: `kept` or `valid` (see opdlab.loss.reduce_token_loss).
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


@dataclass
class StatsOptions:
    """The statistics of the gain.

    Args:
        min_base_kl: positions whose θ0 forward KL is below this are left out of every statistic.
        winsorize: winsorising levels of the OLS (each variable clipped to its [p, 1-p] quantiles).
        bootstrap: cluster-bootstrap draws (clusters: contexts) of the tercile gaps.
        normalization: normalisation of D and C before D^L and D^I (the selectors' `quantile` by default).
        seed: seed of the bootstrap.
    """

    min_base_kl: float = 1e-4
    winsorize: list[float] = field(default_factory=lambda: [0.01, 0.05])
    bootstrap: int = 1000
    normalization: Normalization = "quantile"
    seed: int = 0


# --------------------------------------------------------------------------------------------- the bank
def sample_bank(module, source: PromptSource, opts: BankOptions, device: torch.device) -> list[Rollout]:
    """Sample the bank with the current student (θ0): a list of Rollout parts of `opts.batch_size` rows."""
    stream = source.train_problems(opts.prompt_offset)
    problems = [next(stream) for _ in range(opts.contexts)]
    parts = []
    for start in tqdm(range(0, len(problems), opts.batch_size), desc="bank: sampling θ0 contexts"):
        chunk = problems[start : start + opts.batch_size]
        prompts = encode_prompts(module.tokenizer, [p.prompt for p in chunk], [p.answer for p in chunk],
                                 chat_template=source.use_chat_template)
        seeds = [hash((opts.seed, opts.prompt_offset + start + i)) % (2**63) for i in range(len(chunk))]
        rollout = sample_rollouts(
            module.student, prompts, module.tokenizer.eos_token_id, module.tokenizer.pad_token_id,
            max_new_tokens=opts.max_response_tokens, temperature=opts.temperature, seeds=seeds,
        )
        parts.append(rollout_to(rollout, torch.device("cpu")))
    return parts


def rollout_to(rollout: Rollout, device: torch.device) -> Rollout:
    tensors = {k: getattr(rollout, k).to(device) for k in ("input_ids", "attention_mask", "response_mask", "sampling_logp")}
    return Rollout(**tensors, prompt_len=rollout.prompt_len, answers=list(rollout.answers))


def save_bank(parts: list[Rollout], path: Path) -> None:
    torch.save([asdict(p) for p in parts], path)


def load_bank(path: str | Path) -> list[Rollout]:
    return [Rollout(**p) for p in torch.load(path, weights_only=True)]


@torch.no_grad()
def score_bank(module, parts: list[Rollout], top_k: int, device: torch.device, desc: str) -> dict[str, np.ndarray]:
    """Features of every valid response position of the bank under the module's current student.

    Returns flat arrays (one entry per valid position, contexts in bank order, positions in order).
    """
    module.student.eval()
    columns: dict[str, list] = {}
    first_context = 0
    with tqdm(total=sum(p.response_mask.shape[0] for p in parts), desc=desc, unit="ctx") as bar:
        for part in parts:
            rollout = rollout_to(part, device)
            s_hidden, t_hidden = module.response_hidden_states(rollout, student_grad=False)
            st = compute_token_stats(
                s_hidden, t_hidden, rollout.response_ids, rollout.response_mask, module.student_head,
                module.teacher_head, top_k=top_k, chunk_size=module.hparams.chunk_size, full_kl=True,
            )
            valid = st.valid
            n, length = valid.shape
            context = torch.arange(first_context, first_context + n, device=valid.device)[:, None].expand(n, length)
            position = torch.arange(length, device=valid.device)[None, :].expand(n, length)
            values = {
                "context": context, "position": position, "token_id": rollout.response_ids,
                "D": st.union_kl, "C": st.compat, "H": st.topk_entropy, "teacher_entropy": st.teacher_entropy,
                "student_entropy": st.student_entropy, "student_token_logp": st.student_token_logp,
                "teacher_token_logp": st.teacher_token_logp, "kl_f": st.forward_kl, "kl_r": st.reverse_kl,
            }
            for name, value in values.items():
                columns.setdefault(name, []).append(value[valid].cpu().numpy())
            first_context += n
            bar.update(n)
    return {k: np.concatenate(v) for k, v in columns.items()}


def teachability_columns(base: dict[str, np.ndarray], normalization: Normalization) -> dict[str, np.ndarray]:
    """D̃, C̃ normalised over the whole bank (like `teachability_features` over a batch), D^L and D^I."""
    def norm(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x).float()[None]
        return normalize_scores(t, torch.ones_like(t, dtype=torch.bool), normalization)[0].numpy()

    d, c = norm(base["D"]), norm(base["C"])
    return {"D_norm": d, "C_norm": c, "D_L": d * c, "D_I": d * (1.0 - c)}


def gain(before: np.ndarray, after: np.ndarray, floor: float) -> np.ndarray:
    """(before - after) / before, NaN where before < floor."""
    out = np.full(before.shape, np.nan)
    ok = before >= floor
    out[ok] = (before[ok] - after[ok]) / before[ok]
    return out


def bank_table(base: dict, after: dict, opts: StatsOptions, tokenizer) -> dict[str, np.ndarray]:
    """One row per valid position: θ0 features, θ1 KLs, gains, and whether the row enters the statistics."""
    if not np.array_equal(base["token_id"], after["token_id"]):
        raise RuntimeError("θ0 and θ1 were scored on different contexts; this is a bug in the bank handling")
    table = {k: v for k, v in base.items() if k not in ("kl_f", "kl_r")}
    table["token"] = np.array([tokenizer.convert_ids_to_tokens(int(i)) for i in base["token_id"]], dtype=object)
    table.update(teachability_columns(base, opts.normalization))
    table["HxD"] = base["H"] * base["D"]
    table.update(kl_f_base=base["kl_f"], kl_r_base=base["kl_r"], kl_f_after=after["kl_f"], kl_r_after=after["kl_r"])
    table["gain_f"] = gain(base["kl_f"], after["kl_f"], opts.min_base_kl)
    table["gain_r"] = gain(base["kl_r"], after["kl_r"], opts.min_base_kl)
    table["included"] = np.isfinite(table["gain_f"]) & np.isfinite(table["gain_r"])
    return table


def write_bank(table: dict[str, np.ndarray], out: Path) -> list[str]:
    """bank.csv (and bank.parquet when pyarrow is importable); returns the file names written."""
    import csv

    names = list(table)
    with open(out / "bank.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        for row in zip(*(table[n].tolist() for n in names), strict=True):
            writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
    written = ["bank.csv"]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return written
    pq.write_table(pa.table({n: table[n].tolist() for n in names}), out / "bank.parquet")
    return [*written, "bank.parquet"]


# --------------------------------------------------------------------------------------------- statistics
def gain_statistics(table: dict[str, np.ndarray], opts: StatsOptions) -> dict:
    """Tercile gaps (with bootstrap intervals), standardised OLS fits and decile means, per gain kind."""
    rows = table["included"]
    clusters = table["context"][rows]
    level = min(opts.winsorize, default=0.0)
    result = {"terciles": {}, "terciles_winsorized": {"level": level}, "ols": {}, "deciles": {}}
    for kind, column in GAINS.items():
        g = table[column][rows]
        # G is unbounded below (KL^after >> KL^base at a few positions), so the plain means are
        # outlier-prone; the same gaps of G winsorised at the smallest OLS level are reported beside them.
        for key, y in (("terciles", g), ("terciles_winsorized", winsorize(g, level))):
            result[key][kind] = {
                name: asdict(bootstrap_tercile_gap(table[name][rows], y, clusters, opts.bootstrap, seed=opts.seed))
                for name in PREDICTORS
            }
        result["ols"][kind] = {
            model: {
                f"winsor_{level:g}": standardized_ols(g, {c: table[c][rows] for c in names}, clusters, level).as_dict()
                for level in opts.winsorize
            }
            for model, names in (("raw: G ~ H + D + HxD + C + pos + H_T", RAW_MODEL),
                                 ("teachability: G ~ H + D_L + D_I + pos + H_T", TEACHABILITY_MODEL))
        }
        result["deciles"][kind] = {name: decile_means(table[name][rows], g) for name in PREDICTORS}
    return result


def write_plots(result: dict, out: Path, label: str) -> list[str]:
    deciles = {name: {kind: result["deciles"][kind][name] for kind in GAINS} for name in PREDICTORS}
    plots.plot_deciles(deciles, out / "deciles.png", f"mean gain per predictor decile ({label})")
    winsorized = {k: v for k, v in result["terciles_winsorized"].items() if k != "level"}
    panels = {"mean G": result["terciles"], f"G winsorised at {result['terciles_winsorized']['level']:g}": winsorized}
    plots.plot_tercile_gaps(panels, out / "terciles.png", f"tercile gaps, 95% cluster bootstrap ({label})")
    plots.plot_coefficients(result["ols"]["forward"], out / "coefficients.png",
                            f"standardised OLS of G_f, ±1.96 cluster-robust SE ({label})")
    return ["deciles.png", "terciles.png", "coefficients.png"]


def format_report(result: dict, counts: dict) -> str:
    """A short text report of the headline numbers (printed at the end of the command)."""
    lines = [f"positions: {counts['positions']} in {counts['contexts']} contexts, "
             f"{counts['included']} with KL_f^base >= min_base_kl; mean G_f {counts['mean_gain_f']:.3f}"]
    level = result["terciles_winsorized"]["level"]
    for kind in GAINS:
        lines.append(f"tercile gap of G_{kind[0]} (top - bottom, 95% CI)   | G winsorised at {level:g}:")
        for name, r in result["terciles"][kind].items():
            w = result["terciles_winsorized"][kind][name]
            lines.append(f"  {name:4s} {r['estimate']:+.3f}  [{r['low']:+.3f}, {r['high']:+.3f}]   "
                         f"| {w['estimate']:+.3f}  [{w['low']:+.3f}, {w['high']:+.3f}]")
    for model, fits in result["ols"]["forward"].items():
        lines.append(f"OLS {model} (G_f; coef ± cluster SE):")
        for label, fit in fits.items():
            coefs = "  ".join(f"{n} {c['coef']:+.3f}±{c['se_cluster']:.3f}" for n, c in fit["coefficients"].items())
            lines.append(f"  {label}: {coefs}  R² {fit['r2']:.3f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- θ1
def train_student(module, source: PromptSource, opts: TrainOptions) -> dict:
    """Train the module's student in place for `opts.steps` OPD steps; returns what was run."""
    import lightning as L

    from opdlab.data import PromptDataModule

    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    module.student.train()
    trainer = L.Trainer(
        max_steps=opts.steps, accelerator=opts.accelerator, devices=1, logger=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, inference_mode=False,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=PromptDataModule(source, batch_size=opts.batch_size))
    return {"steps": trainer.global_step, "seconds": round(time.perf_counter() - started, 1)}


def load_student_after(module, path: str, dtype: str) -> None:
    """Replace the module's student with the checkpoint at `path` (tokenizer checked against θ0's)."""
    from opdlab.models import LogitHead, check_tokenizers_compatible, check_vocab_sizes, load_causal_lm, load_tokenizer

    check_tokenizers_compatible(module.tokenizer, load_tokenizer(path))
    device = next(module.student.parameters()).device
    module.student = load_causal_lm(path, dtype).to(device).eval()
    module.student_head = LogitHead(module.student, check_vocab_sizes(module.student, module.teacher, module.tokenizer))


@torch.no_grad()
def student_accuracy(module, source: PromptSource, max_new_tokens: int, batch_size: int = 256) -> float:
    """Greedy accuracy of the module's student on the source's held-out problems."""
    problems, correct = source.eval_problems(), 0
    tok = module.tokenizer
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = encode_prompts(tok, [p.prompt for p in chunk], [p.answer for p in chunk],
                                 chat_template=source.use_chat_template)
        rollout = sample_rollouts(module.student, prompts, tok.eos_token_id, tok.pad_token_id,
                                  max_new_tokens=max_new_tokens, temperature=0.0)
        texts = decode_responses(tok, rollout)
        correct += sum(source.verify(t, p.answer) for t, p in zip(texts, chunk, strict=True))
    return correct / max(len(problems), 1)


# --------------------------------------------------------------------------------------------- the command
def diagnose(
    teacher: str = "toy:add3/teacher",
    student: str = "toy:add3/student",
    source: PromptSource | None = None,
    student_after: str | None = None,
    out_dir: str = "runs/diagnose/add3",
    bank: BankOptions = BankOptions(),
    train: TrainOptions = TrainOptions(),
    stats: StatsOptions = StatsOptions(),
    evaluate: bool = True,
    save_student: bool = True,
    student_dtype: str = "float32",
    teacher_dtype: str = "float32",
    chunk_size: int = 1024,
) -> dict:
    """The fixed-context diagnostic: does a token's θ0 teachability predict how much OPD improves it?

    Args:
        teacher: teacher checkpoint: local directory, hub id, or `toy:<name>/teacher` (as in fit configs).
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
    from opdlab.module import OPDModule

    source = source if source is not None else AdditionTask(digits=3)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    module = OPDModule(
        student=student, teacher=teacher, selector=train.selector or FullSelector(),
        divergence=train.divergence or ReverseKL(),
        optimizer=functools.partial(torch.optim.AdamW, lr=train.lr, weight_decay=0.0, betas=(0.9, 0.98)),
        num_samples=train.num_samples, max_new_tokens=train.max_new_tokens, temperature=train.temperature,
        loss_normalization=train.loss_normalization, chunk_size=chunk_size, student_dtype=student_dtype,
        teacher_dtype=teacher_dtype, seed=train.seed,
    )
    module.configure_model()
    device = pick_device(train.accelerator)
    module.to(device)
    started = time.perf_counter()
    parts = load_bank(bank.path) if bank.path else sample_bank(module, source, bank, device)
    save_bank(parts, out / "bank.pt")
    base = score_bank(module, parts, bank.top_k, device, "scoring θ0")
    accuracy = {"before": student_accuracy(module, source, train.max_new_tokens)} if evaluate else {}
    if student_after:
        load_student_after(module, student_after, student_dtype)
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
    table = bank_table(base, after, stats, module.tokenizer)
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
        **to_jsonable(result),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_report(result, counts))
    if accuracy:
        print(f"student accuracy: θ0 {accuracy['before']:.1%} -> θ1 {accuracy['after']:.1%}")
    print(f"diagnostic written to {out}: {', '.join(summary['files'])}")
    return summary


def bank_counts(table: dict[str, np.ndarray]) -> dict:
    rows = table["included"]
    return {
        "contexts": int(np.unique(table["context"]).size), "positions": int(rows.size), "included": int(rows.sum()),
        "mean_gain_f": float(np.mean(table["gain_f"][rows])) if rows.any() else float("nan"),
        "mean_gain_r": float(np.mean(table["gain_r"][rows])) if rows.any() else float("nan"),
        "mean_kl_f_base": float(table["kl_f_base"].mean()), "mean_kl_f_after": float(table["kl_f_after"].mean()),
    }


def train_summary(train: TrainOptions) -> dict:
    out = {k: v for k, v in asdict(train).items() if k not in ("selector", "divergence")}
    out["selector"] = type(train.selector).__name__ if train.selector else "FullSelector"
    out["divergence"] = type(train.divergence).__name__ if train.divergence else "ReverseKL"
    return out


def pick_device(accelerator: str) -> torch.device:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def to_jsonable(obj):
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def run_diagnose(argv: list[str]) -> None:
    """`opdlab diagnose ...`: jsonargparse turns `diagnose`'s signature and docstrings into --help."""
    from jsonargparse import CLI

    summary = CLI(diagnose, args=argv, prog="opdlab diagnose")
    if isinstance(summary, dict):  # record the command line (not known inside `diagnose`)
        path = Path(summary["out_dir"]) / "summary.json"
        path.write_text(json.dumps({"command": "opdlab diagnose " + " ".join(argv), **summary}, indent=2))
