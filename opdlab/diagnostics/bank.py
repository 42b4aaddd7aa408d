"""The frozen bank of the fixed-context diagnostic: sample it, save/load it, score it, tabulate it.

A bank is a list of `Rollout` parts (one per sampling batch) of student-generated contexts. Scoring
applies `compute_token_stats` (full_kl=True) to every valid response position under the module's
current student; `bank_table` joins the θ0 and θ1 scores of the same positions into one row each.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from opdlab.chunks import TOP_K
from opdlab.diagnostics.probe import token_stats
from opdlab.engines import SamplingParams
from opdlab.rollout import Rollout, derive_seed, encode_prompts
from opdlab.selectors.base import Normalization, normalize_scores
from opdlab.tasks import PromptSource


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
    top_k: int = TOP_K
    temperature: float = 1.0
    seed: int = 0
    prompt_offset: int = 1_000_000
    batch_size: int = 64
    path: str | None = None

    def __post_init__(self) -> None:
        for name in ("contexts", "max_response_tokens", "top_k", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"bank.{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"bank.temperature must be > 0 (the bank is sampled), got {self.temperature}")



def sample_bank(module, source: PromptSource, opts: BankOptions, device: torch.device) -> list[Rollout]:
    """Sample the bank with the current student (θ0): a list of Rollout parts of `opts.batch_size` rows."""
    stream = source.train_problems(opts.prompt_offset)
    problems = [next(stream) for _ in range(opts.contexts)]
    parts = []
    for start in tqdm(range(0, len(problems), opts.batch_size), desc="bank: sampling θ0 contexts"):
        chunk = problems[start : start + opts.batch_size]
        prompts = encode_prompts(module.tokenizer, [p.prompt for p in chunk], [p.answer for p in chunk],
                                 chat_template=source.use_chat_template)
        seeds = [derive_seed(opts.seed, opts.prompt_offset + start + i) for i in range(len(chunk))]
        rollout = module.generate(prompts, SamplingParams(
            max_new_tokens=opts.max_response_tokens, temperature=opts.temperature, seeds=seeds,
        ))
        parts.append(rollout_to(rollout, torch.device("cpu")))
    return parts


def rollout_to(rollout: Rollout, device: torch.device) -> Rollout:
    tensors = {k: getattr(rollout, k).to(device) for k in ("input_ids", "attention_mask", "response_mask", "sampling_logp")}
    return Rollout(**tensors, prompt_len=rollout.prompt_len, answers=list(rollout.answers))


def save_bank(parts: list[Rollout], path: Path) -> None:
    torch.save([asdict(p) for p in parts], path)


def load_bank(path: str | Path) -> list[Rollout]:
    """The frozen contexts `save_bank` wrote (a diagnose's bank.pt); anything else is refused in one line."""
    try:
        parts = [Rollout(**p) for p in torch.load(path, weights_only=True)]
        if not parts:
            raise ValueError("it holds no contexts")
        return parts
    except Exception as err:  # not a torch file, a torch file of something else, a truncated one
        raise ValueError(f"bank.path {path} is not a bank that opdlab diagnose wrote (bank.pt in its --out_dir): "
                         f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


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
            st = token_stats(module, rollout, top_k=top_k, full_kl=True, full_entropy=True)
            valid = st.valid
            n, length = valid.shape
            context = torch.arange(first_context, first_context + n, device=valid.device)[:, None].expand(n, length)
            position = torch.arange(length, device=valid.device)[None, :].expand(n, length)
            values = {
                "context": context, "position": position, "token_id": rollout.response_ids,
                "disagreement": st.disagreement, "compatibility": st.compatibility, "topk_entropy": st.topk_entropy, "teacher_entropy": st.teacher_entropy,
                "student_entropy": st.student_entropy, "student_token_logp": st.student_token_logp,
                "teacher_token_logp": st.teacher_token_logp, "forward_kl": st.forward_kl, "reverse_kl": st.reverse_kl,
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

    d, c = norm(base["disagreement"]), norm(base["compatibility"])
    return {"disagreement_norm": d, "compatibility_norm": c, "teachability": d * c, "incompatibility": d * (1.0 - c)}


def gain(before: np.ndarray, after: np.ndarray, floor: float) -> np.ndarray:
    """(before - after) / before, NaN where before < floor."""
    out = np.full(before.shape, np.nan)
    ok = before >= floor
    out[ok] = (before[ok] - after[ok]) / before[ok]
    return out


def bank_table(base: dict, after: dict, tokenizer, normalization: Normalization, min_base_kl: float) -> dict[str, np.ndarray]:
    """One row per valid position: θ0 features, θ1 KLs, gains, and whether the row enters the statistics."""
    if not np.array_equal(base["token_id"], after["token_id"]):
        raise RuntimeError("θ0 and θ1 were scored on different contexts; this is a bug in the bank handling")
    table = {k: v for k, v in base.items() if k not in ("forward_kl", "reverse_kl")}
    table["token"] = np.array([tokenizer.convert_ids_to_tokens(int(i)) for i in base["token_id"]], dtype=object)
    table.update(teachability_columns(base, normalization))
    table["topk_entropy_x_disagreement"] = base["topk_entropy"] * base["disagreement"]
    table.update(forward_kl_base=base["forward_kl"], reverse_kl_base=base["reverse_kl"],
                 forward_kl_after=after["forward_kl"], reverse_kl_after=after["reverse_kl"])
    table["forward_gain"] = gain(base["forward_kl"], after["forward_kl"], min_base_kl)
    table["reverse_gain"] = gain(base["reverse_kl"], after["reverse_kl"], min_base_kl)
    table["included"] = np.isfinite(table["forward_gain"]) & np.isfinite(table["reverse_gain"])
    return table


def write_bank(table: dict[str, np.ndarray], out: Path) -> list[str]:
    """bank.csv (and bank.parquet when pyarrow is importable); returns the file names written."""
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


def bank_counts(table: dict[str, np.ndarray]) -> dict:
    rows = table["included"]
    return {
        "contexts": int(np.unique(table["context"]).size), "positions": int(rows.size), "included": int(rows.sum()),
        "mean_forward_gain": float(np.mean(table["forward_gain"][rows])) if rows.any() else float("nan"),
        "mean_reverse_gain": float(np.mean(table["reverse_gain"][rows])) if rows.any() else float("nan"),
        "mean_forward_kl_base": float(table["forward_kl_base"].mean()), "mean_forward_kl_after": float(table["forward_kl_after"].mean()),
    }
