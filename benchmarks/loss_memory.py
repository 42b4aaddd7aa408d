"""Peak memory and time of one training step's loss path: opdlab vs the full-logits (TRL-style) way.

The loss path starts from final hidden states (student: a leaf with grad, teacher: no grad) and ends
after backward: scoring + selection + loss + backward, with random LM heads of a real vocabulary.

    python benchmarks/loss_memory.py                       # vocab 151,936, hidden 1024, 2,048 tokens
    python benchmarks/loss_memory.py --tokens 8192         # opdlab only: the naive way needs > 40 GB
    python benchmarks/loss_memory.py --device cuda --tokens 8192

Methods (each configuration runs in a fresh subprocess; rounds are interleaved and rotated):
- naive: student logits (T, V) with grad and teacher logits (T, V), the selection features read off
  those logits, the divergence on every row through autograd, the loss masked by the keep mask. This
  is what a TRL-style trainer or the reference TA-OPD code does.
- naive+opdlab-loss: the same full logits with opdlab's hand-written-gradient loss (KL / JSD): how much
  of the gap is the loss kernel rather than the selective heads.
- opdlab: `compute_token_stats` (chunked, no grad; no full-vocabulary entropies, which no built-in
  selector reads: the training step's default) -> selector -> `head_loss` on the kept rows (chunks of
  a quarter of the scoring chunk, logit gradients stored up to two scoring chunks) -> backward: the
  step plan of `OPDModule.training_step` below ratio 1.
- opdlab-fused (ratio 1 only): `head_loss` with `scoring`, statistics and loss from one projection per
  chunk: the step plan at ratio 1 (where `opdlab` is the two-pass way, kept for comparison).
- trl-chunked (when `trl` is installed): TRL 1.16's `ChunkedDivergenceFunction` (the loss of its
  `DistillationTrainer`) on every row at ratio 1; below ratio 1 on the rows opdlab's selection kept.
- floor: just the two heads' no-grad matmuls over all rows, chunk by chunk (the time floor).
- exact-floor: the floor plus the student head with grad on the kept rows and its backward (the work any
  exact selective method does); "this/exact floor time" in the table.

The trl-chunked rows need TRL beside opdlab, e.g. the side venv of benchmarks/vs_trl.py:
    /tmp/trlvenv/bin/python benchmarks/loss_memory.py --ratios 1.0 0.05 --repeats 2

Peak memory: CPU = VmHWM - VmRSS after the inputs are allocated (the high-water mark is reset via
/proc/self/clear_refs); CUDA = max_memory_allocated - memory_allocated at the same point.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from types import SimpleNamespace

import torch
from report import publish
from torch import nn

from opdlab.divergences import ForwardKL, GeneralizedJSD, LossInputs, ReverseKL, SampledTokenOPD
from opdlab.heads import LogitHead
from opdlab.loss import Scoring, head_loss, kept_rows
from opdlab.maths import log_softmax_fp32, masked_kl
from opdlab.rollout import Rollout
from opdlab.scoring import Workspace, chunk_stats, compute_token_stats, head_logits, scatter_rows
from opdlab.selectors import TeachabilitySelector

DIVERGENCES = {"reverse_kl": ReverseKL, "forward_kl": ForwardKL, "jsd": GeneralizedJSD, "sampled_token": SampledTokenOPD}
# TRL's beta for the same divergence (its ChunkedDivergenceFunction: 0 forward KL, 1 reverse KL, between: JSD)
TRL_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}
SEQ_LEN = 256  # response length; N = tokens / SEQ_LEN sequences, every position valid
# fp32 (T, V) tensors alive at the naive peak, per divergence (measured at 2,048 tokens: 12.2 / 5.9 GB)
NAIVE_BYTES_PER_LOGIT = {"reverse_kl": 4 * 10, "forward_kl": 4 * 10, "jsd": 4 * 14, "sampled_token": 4 * 5}


# ------------------------------------------------------------------------------------------ inputs
class HeadOnly(nn.Module):
    """Just enough of a causal LM for `LogitHead`: an output embedding and a config."""

    def __init__(self, hidden: int, vocab: int, dtype: torch.dtype, device: str, trainable: bool) -> None:
        super().__init__()
        self.config = SimpleNamespace()
        self.lm_head = nn.Linear(hidden, vocab, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            self.lm_head.weight.normal_(0.0, 1.0 / math.sqrt(hidden))  # logits of O(1), like a real head
        self.lm_head.weight.requires_grad_(trainable)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head


def make_inputs(args) -> SimpleNamespace:
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    n = args.tokens // SEQ_LEN
    student, teacher = (HeadOnly(args.hidden, args.vocab, dtype, args.device, args.train_head and i == 0)
                        for i in range(2))
    s_hidden = torch.randn(n, SEQ_LEN, args.hidden, device=args.device, dtype=dtype).requires_grad_(True)
    t_hidden = torch.randn(n, SEQ_LEN, args.hidden, device=args.device, dtype=dtype)
    tokens = torch.randint(0, args.vocab, (n, SEQ_LEN), device=args.device)
    valid = torch.ones(n, SEQ_LEN, dtype=torch.bool, device=args.device)
    rollout = Rollout(
        input_ids=torch.cat([torch.zeros(n, 1, dtype=torch.long, device=args.device), tokens], 1),
        attention_mask=torch.ones(n, SEQ_LEN + 1, dtype=torch.long, device=args.device),
        response_mask=valid, sampling_logp=-torch.rand(n, SEQ_LEN, device=args.device) * 3, prompt_len=1,
    )
    return SimpleNamespace(student=student, teacher=teacher, s_head=LogitHead(student), t_head=LogitHead(teacher),
                           s_hidden=s_hidden, t_hidden=t_hidden, tokens=tokens, valid=valid, rollout=rollout)


# ------------------------------------------------------------------------------------------ methods
def score_and_select(x, selector, chunk: int):
    """opdlab's scoring pass (chunked, no grad, no full-vocabulary entropies: the training step's default) and
    the selector's keep mask: (stats, keep (N, L) bool)."""
    stats = compute_token_stats(x.s_hidden.detach(), x.t_hidden, x.tokens, x.valid, x.s_head, x.t_head,
                                top_k=selector.top_k, chunk_size=chunk, full_entropy=False)
    return stats, selector.select(stats)


def run_opdlab(x, selector, divergence, chunk: int) -> None:
    stats, keep = score_and_select(x, selector, chunk)
    rows = kept_rows(keep, x.s_hidden, x.t_hidden, x.rollout, stats.teacher_token_logp)
    head_loss(rows, x.s_head, x.t_head, divergence, 1.0 / float(keep.sum()), chunk_rows=x.loss_chunk or max(1, chunk // 4),
              store_rows=2 * chunk).loss.backward()  # the chunk sizes of opdlab.step.plan_step


def run_fused(x, selector, divergence, chunk: int) -> None:
    assert selector.ratio == 1.0, "the shared projection is the ratio-1 path"
    rows = kept_rows(x.valid, x.s_hidden, x.t_hidden, x.rollout)
    head_loss(rows, x.s_head, x.t_head, divergence, 1.0 / float(x.valid.sum()), chunk_rows=chunk,
              scoring=Scoring(selector.top_k)).loss.backward()


def run_naive(x, selector, divergence, chunk: int, loss: str = "autograd") -> None:
    """Full (T, V) logits of both models, features read off them, the loss masked (TRL / reference code).

    loss="autograd": the divergence's formula through autograd, as TRL's losses and the reference TA-OPD
    code compute it (`autograd_token_loss` for the KL/JSD family; the sampled-token loss has no other form);
    loss="opdlab": the divergence's own `token_loss` (opdlab's hand-written gradient) on the full logits.
    """
    s_logits = x.s_head(x.s_hidden.flatten(0, 1))  # (T, V) with grad
    with torch.no_grad():
        t_logits = x.t_head(x.t_hidden.flatten(0, 1))  # (T, V)
        rows = torch.arange(s_logits.shape[0], device=s_logits.device)
        tok = x.tokens.flatten()
        work, chunks = Workspace(1024), []  # features from the logits already held, 1024 rows at a time
        for start in range(0, rows.numel(), 1024):
            r = slice(start, start + 1024)
            chunks.append(chunk_stats(s_logits[r].detach().float(), t_logits[r].float(), tok[r], selector.top_k,
                                      False, work, full_entropy=False))
        del work
        stats = scatter_rows(chunks, rows, x.valid, selector.top_k, False, full_entropy=False)
    keep = selector.select(stats).flatten()
    full_vocab = isinstance(divergence, (ReverseKL, ForwardKL, GeneralizedJSD))
    loss_fn = (partial(autograd_token_loss, beta=jsd_beta(divergence)) if loss == "autograd" and full_vocab
               else divergence.token_loss)
    token_loss = loss_fn(LossInputs(
        student_logits=s_logits, teacher_logits=t_logits, tokens=tok,
        sampling_logp=x.rollout.sampling_logp.flatten(), teacher_token_logp=stats.teacher_token_logp.flatten(),
    ))
    loss = torch.where(keep, token_loss, torch.zeros_like(token_loss)).sum() / keep.sum()
    loss.backward()


def jsd_beta(divergence) -> float:
    """The divergence as a member of the generalized-JSD family (0 forward KL, 1 reverse KL)."""
    return {ForwardKL: 0.0, ReverseKL: 1.0}.get(type(divergence), getattr(divergence, "beta", 0.5))


def autograd_token_loss(inputs: LossInputs, beta: float) -> torch.Tensor:
    """The KL/JSD family per row through autograd (clamped fp32 log-softmaxes, then the KL terms), the
    formulas TRL's `generalized_jsd_loss` and the reference TA-OPD code differentiate; opdlab's divergences
    write their gradient by hand instead. beta as in TRL: 0 KL(T || S), 1 KL(S || T), else the JSD with the
    mixture M = beta·T + (1 - beta)·S."""
    s, t = log_softmax_fp32(inputs.student_logits), log_softmax_fp32(inputs.teacher_logits.detach())
    if beta == 0.0:
        return masked_kl(t, s)
    if beta == 1.0:
        return masked_kl(s, t)
    m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), 0)
    return beta * masked_kl(t, m) + (1 - beta) * masked_kl(s, m)


def run_trl(x, selector, divergence, chunk: int) -> None:
    """TRL 1.16's `ChunkedDivergenceFunction` (vocabulary tiles of 32,768, rows of 4,096; the divergence's
    statistics in one pass, its gradient in a second that projects both heads again). At ratio 1 on every row,
    as `DistillationTrainer` uses it; below ratio 1 on the rows opdlab's scoring pass and selector kept (TRL
    has no selection: this is TRL's loss kernel inside opdlab's selective path)."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    s_flat, t_flat = x.s_hidden.flatten(0, 1), x.t_hidden.flatten(0, 1)
    if selector.ratio < 1.0:
        keep = score_and_select(x, selector, chunk)[1].flatten().nonzero().squeeze(-1)
        s_flat, t_flat = s_flat[keep], t_flat[keep]
    per_token, _ = ChunkedDivergenceFunction.apply(s_flat, x.student.lm_head.weight, None, t_flat,
                                                   x.teacher.lm_head.weight, None, jsd_beta(divergence))
    per_token.mean().backward()


def has_trl() -> bool:
    try:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction  # noqa: F401
    except ImportError:
        return False
    return True


@torch.no_grad()
def run_floor(x, selector, divergence, chunk: int) -> None:
    """The time floor: both heads' matmuls over every row, chunk by chunk, nothing else."""
    s_flat, t_flat = x.s_hidden.detach().flatten(0, 1), x.t_hidden.flatten(0, 1)
    work = Workspace(chunk)
    for start in range(0, s_flat.shape[0], chunk):
        head_logits(x.s_head, s_flat[start : start + chunk], work, "student")
        head_logits(x.t_head, t_flat[start : start + chunk], work, "teacher")


def run_exact_floor(x, selector, divergence, chunk: int) -> None:
    """The work any exact selective method must do: both heads' no-grad matmuls over every row (the features
    that choose the rows), then the student head with grad on the kept rows and its backward (the hidden
    states' gradient, and the weight's when the head is trained). At ratio 1 the student's scoring matmul is
    that with-grad forward (one student projection, not two). Teacher recomputation, the statistics and the
    loss's elementwise work are what a method adds on top."""
    s_flat, t_flat = x.s_hidden.flatten(0, 1), x.t_hidden.flatten(0, 1)
    work = Workspace(chunk)
    with torch.no_grad():
        for start in range(0, s_flat.shape[0], chunk):
            head_logits(x.t_head, t_flat[start : start + chunk], work, "teacher")
            if selector.ratio < 1.0:
                head_logits(x.s_head, s_flat[start : start + chunk].detach(), work, "student")
    kept = s_flat[: math.ceil(round(selector.ratio * s_flat.shape[0], 6))]
    for start in range(0, kept.shape[0], chunk):
        logits = x.s_head(kept[start : start + chunk])
        logits.backward(torch.ones_like(logits))


def run_naive_opdlab_loss(x, selector, divergence, chunk: int) -> None:
    run_naive(x, selector, divergence, chunk, loss="opdlab")


METHODS = {"naive": run_naive, "naive+opdlab-loss": run_naive_opdlab_loss, "opdlab": run_opdlab,
           "opdlab-fused": run_fused, "trl-chunked": run_trl, "floor": run_floor, "exact-floor": run_exact_floor}


# ------------------------------------------------------------------------------------------ measuring
def memory_now(device: str) -> tuple[float, float]:
    """(current, peak) in MB for this process on `device`."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated() / 2**20, torch.cuda.max_memory_allocated() / 2**20
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS


def worker(args) -> dict:
    """One configuration in this (fresh) process: one measured run after a tiny warm-up."""
    x = make_inputs(args)
    selector = TeachabilitySelector(ratio=args.ratio, top_k=16)
    divergence = DIVERGENCES.get(args.divergence, ReverseKL)()
    small = SimpleNamespace(**{**vars(args), "tokens": SEQ_LEN, "vocab": 1024})
    warm = make_inputs(small)
    warm.loss_chunk = x.loss_chunk = args.loss_chunk_size
    METHODS[args.method](warm, selector, divergence, args.chunk_size)  # thread pools, kernels
    x.s_hidden.grad = None
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    reset_peak(args.device)
    base, _ = memory_now(args.device)
    sync()
    start, cpu_start = time.perf_counter(), time.process_time()
    METHODS[args.method](x, selector, divergence, args.chunk_size)
    sync()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    _, peak = memory_now(args.device)
    if not args.method.endswith("floor"):
        assert x.s_hidden.grad is not None and torch.isfinite(x.s_hidden.grad).all()
    return {"peak_mb": peak - base, "seconds": seconds, "cpu_seconds": cpu_seconds}


def run_config(args, method: str, ratio: float, divergence: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--ratio", str(ratio), "--divergence", divergence,
           "--device", args.device, "--vocab", str(args.vocab), "--hidden", str(args.hidden),
           "--tokens", str(args.tokens), "--chunk-size", str(args.chunk_size), "--dtype", args.dtype,
           "--loss-chunk-size", str(args.loss_chunk_size)]
    if not args.train_head:
        cmd.append("--frozen-head")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{method} ratio={ratio} {divergence} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def configs(args) -> list[tuple[str, float, str]]:
    out = [("floor", 1.0, "-")] + [("exact-floor", ratio, "-") for ratio in args.ratios]
    trl = has_trl()
    if not trl:
        print("# trl-chunked rows skipped: TRL is not installed (pip install trl==1.16.0)")
    for div in args.divergences:
        naive_gb = NAIVE_BYTES_PER_LOGIT[div] * args.tokens * args.vocab / 2**30
        run_naive_too = naive_gb <= args.max_gb
        if not run_naive_too:
            print(f"# naive {div} skipped: it would need ~{naive_gb:.0f} GB (> --max-gb {args.max_gb}) "
                  f"at {args.tokens} tokens")
        for ratio in args.ratios:
            if run_naive_too:
                out.append(("naive", ratio, div))
                if DIVERGENCES[div] is ReverseKL and ratio in (1.0, min(args.ratios)):  # a hand-written gradient
                    out.append(("naive+opdlab-loss", ratio, div))
            out.append(("opdlab", ratio, div))
            if ratio == 1.0:
                out.append(("opdlab-fused", ratio, div))
            if trl and div in TRL_BETA:
                out.append(("trl-chunked", ratio, div))
    return out


def table(args, results: dict) -> str:
    med = {k: tuple(statistics.median(r[key] for r in v) for key in ("peak_mb", "seconds", "cpu_seconds"))
           for k, v in results.items()}
    floor_s, floor_cpu = med[("floor", 1.0, "-")][1:]
    v, c = args.vocab, min(args.chunk_size, args.tokens)
    head_grad = v * args.hidden * 4 if args.train_head else 0  # the head weight's own gradient: every method holds it
    lines = [
        "| divergence | ratio | method | peak MB | time s | naive/this memory | naive/this time "
        "(CPU time) | memory floor MB | this/floor memory | this/floor time (CPU time) | this/exact floor time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (method, ratio, div), (mb, s, cpu) in med.items():
        if method.endswith("floor"):
            continue
        exact_s = med[("exact-floor", ratio, "-")][1]
        naive = med.get(("naive", ratio, div))
        kept = math.ceil(round(ratio * args.tokens, 6))
        floor_mb = (2 * kept * v * 4 + 2 * c * v * 4 + head_grad) / 2**20
        lines.append(
            f"| {div} | {ratio:g} | {method} | {mb:,.0f} | {s:.2f} | "
            + (f"{naive[0] / mb:.1f}x | {naive[1] / s:.2f}x ({naive[2] / cpu:.2f}x)" if naive and method != "naive"
               else "- | -")
            + f" | {floor_mb:,.0f} | {mb / floor_mb:.2f} | {s / floor_s:.2f} ({cpu / floor_cpu:.2f}) | {s / exact_s:.2f} |"
        )
    exact = ", ".join(f"{ratio:g}: {med[('exact-floor', ratio, '-')][1]:.2f} s" for ratio in args.ratios)
    lines.append(f"\nTime floor (two no-grad head matmuls over all {args.tokens} rows, chunk {c}): {floor_s:.2f} s "
                 f"({floor_cpu:.2f} s CPU). "
                 "Memory floor: 2 · kept rows · V · 4 B (kept logits + their gradient) + 2 · chunk · V · 4 B "
                 "(one scoring chunk per model)"
                 + (" + V · H · 4 B (the trained head weight's gradient, which every method holds)." if args.train_head
                    else "; head frozen.")
                 + f" Exact floor by ratio ({exact}): the time floor plus the student head with grad on the kept rows "
                 "and its backward, the work any exact selective method does (`run_exact_floor`; at ratio 1 the "
                 "student's with-grad forward replaces its no-grad one). Liger's fused-linear JSD needs Triton on a "
                 "GPU: no Liger rows on a CPU.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=2048, help="N·L response tokens (multiple of 256)")
    p.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.10, 0.05])
    p.add_argument("--divergences", nargs="+", default=list(DIVERGENCES), choices=list(DIVERGENCES))
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--loss-chunk-size", type=int, default=0,
                   help="kept rows per chunk of opdlab's loss pass (default: --chunk-size // 4)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--frozen-head", dest="train_head", action="store_false",
                   help="freeze the student head weight (only the hidden states get a gradient, as with a frozen "
                        "or LoRA-adapted head); by default it is trained, as in full-parameter OPD")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--max-gb", type=float, default=18.0, help="skip the naive reference above this estimate")
    p.add_argument("--output", help="append the markdown result here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--ratio", type=float, help=argparse.SUPPRESS)
    p.add_argument("--divergence", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tokens % SEQ_LEN:
        p.error(f"--tokens must be a multiple of {SEQ_LEN}, got {args.tokens}")
    if args.worker:
        print(json.dumps(worker(args)))
        return
    todo, results = configs(args), {}
    for rnd in range(args.repeats):
        shift = rnd % len(todo)
        for cfg in todo[shift:] + todo[:shift]:  # rotate so no method always runs first or last
            r = run_config(args, *cfg)
            results.setdefault(cfg, []).append(r)
            print(f"# round {rnd + 1}: {cfg[0]:>12} ratio {cfg[1]:<5g} {cfg[2]:<13} "
                  f"{r['peak_mb']:9,.0f} MB {r['seconds']:7.2f} s {r['cpu_seconds']:7.2f} s CPU", flush=True)
    results = {cfg: results[cfg] for cfg in todo}
    publish("loss_memory",
            f"{platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads, "
            f"torch {torch.__version__}, device {args.device}.",
            f"Vocab {args.vocab:,}, hidden {args.hidden}, {args.tokens:,} response tokens, {args.dtype}, "
            f"chunk {args.chunk_size}, teachability selector (top-K 16), student head "
            f"{'trained' if args.train_head else 'frozen'}, medians of {args.repeats} rounds.\n",
            table(args, results), args.output)


if __name__ == "__main__":
    main()
