"""Shared test fixtures: tiny local HF checkpoints (no hub, no toy cache) and an isolated cache dir.

- `tiny_checkpoints`: a random-init Qwen2 student (h32/L1) and a slightly bigger teacher (h48/L2), each
  saved with the character tokenizer into its own directory, built once per session (~1 s).
- `make_scripted_model`: a Qwen2 whose next token is a fixed function of the current token (for EOS
  edge cases without a trained model).
- `run_opdlab(args)`: the `opdlab` command in-process, returning its exit code and output.
- Every test runs with `OPDLAB_CACHE` pointing at a session tmp dir, so nothing reads or writes
  ~/.cache/opdlab (and nothing can silently reuse a prebuilt toy), with all RNGs seeded and with one
  torch thread (tiny models are dominated by thread overhead).
"""

from __future__ import annotations

import io
import random
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from opdlab.loss import HeadLoss, Scoring, head_loss, kept_rows
from opdlab.scoring import TokenStats, scatter_rows
from opdlab.toy import ModelSpec, build_char_tokenizer, make_qwen2

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"

TINY_STUDENT = ModelSpec(hidden=32, layers=1, ffn=64, heads=2, kv_heads=1)
TINY_TEACHER = ModelSpec(hidden=48, layers=2, ffn=96, heads=2, kv_heads=1)


@dataclass(frozen=True)
class TinyCheckpoints:
    student: str  # directory of a saved HF checkpoint + tokenizer
    teacher: str


def seed_all(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(scope="session", autouse=True)
def isolated_opdlab_cache(tmp_path_factory):
    """Point OPDLAB_CACHE at a fresh session directory so tests never touch (or reuse) ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("opdlab_cache")
        mp.setenv("OPDLAB_CACHE", str(path))
        mp.delenv("OPDLAB_TOY_SEED", raising=False)
        yield path


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread():
    """One intra-op thread: on a busy 2-core machine a tiny model's forward takes ~150 ms with two
    spinning OpenMP threads and under 1 ms with one, so the suite runs many times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same RNG state (python, numpy, torch)."""
    seed_all(0)
    yield


@pytest.fixture(scope="session")
def char_tokenizer():
    return build_char_tokenizer()


def save_tiny_model(spec: ModelSpec, tokenizer, path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    model = make_qwen2(spec, tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, char_tokenizer) -> TinyCheckpoints:
    """Random-init tiny Qwen2 student and teacher saved as local HF checkpoints (tokenizer included)."""
    student = save_tiny_model(TINY_STUDENT, char_tokenizer, tmp_path_factory.mktemp("tiny_student"), seed=1)
    teacher = save_tiny_model(TINY_TEACHER, char_tokenizer, tmp_path_factory.mktemp("tiny_teacher"), seed=2)
    return TinyCheckpoints(student=student, teacher=teacher)


@pytest.fixture
def tiny_module(tiny_checkpoints):
    """An `OPDModule` over the tiny checkpoints with its models built (`configure_model` called)."""
    from opdlab.module import OPDModule

    module = OPDModule(
        student=tiny_checkpoints.student,
        teacher=tiny_checkpoints.teacher,
        rollout=dict(max_new_tokens=4),
    )
    module.configure_model()
    return module


def scripted_qwen2(tokenizer, next_token: dict[str, str], default: str | None = None, scale: float = 30.0):
    """A Qwen2 that (almost surely) emits `next_token[current token]` after each token.

    Every block's output projections are zeroed, so the residual stream is the current token's embedding;
    embeddings are one-hot on the token id, and the LM head maps each id to its scripted successor
    with a large logit. Tokens without a rule use `default` (or give uniform logits when it is None).
    """
    vocab = tokenizer.get_vocab()
    spec = ModelSpec(hidden=max(64, len(tokenizer)), layers=1, ffn=32, heads=2, kv_heads=1)  # head_dim 32 (vLLM's CPU minimum)
    model = make_qwen2(spec, tokenizer)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[torch.arange(len(tokenizer)), torch.arange(len(tokenizer))] = 1.0
        head = model.lm_head.weight
        head.zero_()
        for tok, tok_id in vocab.items():
            target = next_token.get(tok, default)
            if target is not None:
                head[vocab[target], tok_id] = scale
    return model.eval()


@pytest.fixture(scope="session")
def make_scripted_model(char_tokenizer):
    return lambda next_token, default=None: scripted_qwen2(char_tokenizer, next_token, default)


@dataclass
class CliResult:
    code: int | str  # SystemExit code (0 when main returned normally)
    out: str
    err: str


def run_opdlab(args: list[str]) -> CliResult:
    """Run `opdlab <args>` in-process, capturing stdout/stderr and SystemExit."""
    from opdlab.cli import main

    out, err = io.StringIO(), io.StringIO()
    code: int | str = 0
    # sys.argv holds only the program name: LightningCLI warns when it and `args` are both given.
    with mock.patch.object(sys, "argv", ["opdlab"]), redirect_stdout(out), redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exc:
            code = 0 if exc.code is None else exc.code
    return CliResult(code, out.getvalue(), err.getvalue())


def kept_head_loss(student_hidden, teacher_hidden, keep, rollout, stats, student_head, teacher_head, divergence,
                   chunk_size: int = 1024, store_rows: int = 0, denominator=None) -> HeadLoss:
    """The training step's sparse path: `head_loss` over the rows of `keep`, a mean over them (or over
    `denominator` tokens)."""
    rows = kept_rows(keep, student_hidden, teacher_hidden, rollout, stats.teacher_token_logp)
    count = float(keep.sum() if denominator is None else denominator)
    return head_loss(rows, student_head, teacher_head, divergence, 1.0 / max(count, 1.0), chunk_size, store_rows)


def shared_head_loss(student_hidden, teacher_hidden, rollout, student_head, teacher_head, divergence, top_k: int,
                     chunk_size: int, full_kl: bool = False, full_entropy: bool = True,
                     topk_lists: bool = True) -> tuple[TokenStats, HeadLoss]:
    """The training step's ratio-1 path: statistics and the mean loss of every valid row from one projection."""
    valid = rollout.response_mask.bool()
    rows = kept_rows(valid, student_hidden, teacher_hidden, rollout)
    loss = head_loss(rows, student_head, teacher_head, divergence, 1.0 / max(float(valid.sum()), 1.0), chunk_size,
                     scoring=Scoring(top_k, full_kl, full_entropy, topk_lists))
    return scatter_rows(loss.stats, rows.index, valid, top_k, full_kl, full_entropy, topk_lists), loss


def response_hidden_states(module, rollout, student_grad: bool = True):
    """The student's and a local teacher's (N, L, H) hidden states that predict the response tokens (the teacher's
    as a plain tensor, for tests that compare with full logits; a step hands the teacher on as `TeacherRows`)."""
    from opdlab.models import final_hidden_states
    from opdlab.rollout import response_positions

    with torch.no_grad():
        teacher = final_hidden_states(module.teacher, rollout.input_ids, rollout.attention_mask)[:, response_positions(rollout)]
    return module.student_hidden_states(rollout, student_grad), teacher


def score(module, student_hidden, teacher_hidden, rollout) -> TokenStats:
    """The statistics of every valid position as the training step's scoring pass computes them."""
    from opdlab.step import score as score_rows
    from opdlab.teachers import HeadRows

    rows = rollout.response_mask.shape[0]
    plan = replace(module.plan(rows), micro_batches=(slice(0, rows),), shared_projection=False)
    teacher = HeadRows(teacher_hidden.flatten(0, 1), module.placement.head)
    return score_rows([(student_hidden, teacher)], rollout, plan, module.student_head, plan.scoring(module.selector.top_k))
