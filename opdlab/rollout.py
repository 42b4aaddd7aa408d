"""Student sampling: prompts -> `Rollout` (prompt + response ids, masks, sampling log-probs).

Generation is a plain KV-cached loop rather than `generate()`: it records the log-probability of each
sampled token under the sampling distribution (temperature, top-p) without keeping per-step (N, V)
scores, only ever computes the last position's logits, and stops as soon as every row hit EOS.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import torch

from opdlab.distributed import all_reduce_sum

if TYPE_CHECKING:  # transformers is imported where a model runs (see opdlab.models)
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class PromptBatch:
    """Left-padded prompt ids. input_ids, attention_mask: (B, P)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answers: list[str] = field(default_factory=list)


@dataclass
class Rollout:
    """Prompt + sampled response. input_ids/attention_mask: (N, P + L); the rest (N, L).

    `response_mask` is True on generated tokens up to and including EOS; later positions are padding.
    `sampling_logp` is log p(token) under the distribution actually sampled from (after temperature
    and top-p), the "old policy" of the PPO-style loss.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    sampling_logp: torch.Tensor
    prompt_len: int
    answers: list[str] = field(default_factory=list)

    @property
    def response_ids(self) -> torch.Tensor:  # (N, L)
        return self.input_ids[:, self.prompt_len :]

    def to(self, device: torch.device | str) -> Rollout:
        """This rollout on `device` (the same object when every tensor is there already)."""
        tensors = ("input_ids", "attention_mask", "response_mask", "sampling_logp")
        if all(getattr(self, name).device == torch.device(device) for name in tensors):
            return self
        return replace(self, **{name: getattr(self, name).to(device) for name in tensors})

    def rows(self, rows: slice) -> Rollout:
        """The rollout of rows `rows` (a micro-batch)."""
        return replace(self, input_ids=self.input_ids[rows], attention_mask=self.attention_mask[rows],
                       response_mask=self.response_mask[rows], sampling_logp=self.sampling_logp[rows],
                       answers=self.answers[rows])


def response_positions(rollout: Rollout) -> slice:
    """The positions of (N, P + L) model outputs that predict the response tokens: p - 1 + t predicts token t."""
    p = rollout.prompt_len
    return slice(p - 1, p - 1 + rollout.response_mask.shape[1])


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    answers: list[str] | None = None,
    max_prompt_len: int = 512,
    on_long_prompt: Literal["truncate", "error"] = "truncate",
    chat_template: bool = False,
) -> PromptBatch:
    """Tokenize and left-pad prompts.

    A prompt longer than `max_prompt_len` tokens is either cut from the left (keeping its end, where the
    question usually is) with a warning, or refused (`on_long_prompt="error"`).
    """
    if max_prompt_len < 1:
        raise ValueError(f"max_prompt_len must be >= 1 token, got {max_prompt_len}")
    if chat_template:
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    ids = tokenizer(prompts, add_special_tokens=not chat_template)["input_ids"]
    too_long = [i for i, x in enumerate(ids) if len(x) > max_prompt_len]
    if too_long:
        longest = max(len(ids[i]) for i in too_long)
        msg = (
            f"{len(too_long)} of {len(ids)} prompts exceed max_prompt_len={max_prompt_len} tokens "
            f"(longest {longest})"
        )
        if on_long_prompt == "error":
            raise ValueError(f"{msg}; raise max_prompt_len or set on_long_prompt='truncate'")
        warnings.warn(f"{msg}; keeping their last {max_prompt_len} tokens", stacklevel=2)
        ids = [x[-max_prompt_len:] for x in ids]
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], dtype=torch.long)
    return PromptBatch(input_ids, attention_mask, list(answers or []))


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(N, V) logits -> (N, V) fp32 log-probs of the sampling distribution (-inf outside the top-p set)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        # Drop a token when the mass strictly before it already reaches top_p (the first always stays).
        before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()
        drop = (before >= top_p).scatter(-1, order, before >= top_p)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    return logp


@torch.no_grad()
def sample_rollouts(
    model: PreTrainedModel,
    prompts: PromptBatch,
    eos_token_id: int,
    pad_token_id: int,
    num_samples: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    seeds: list[int] | None = None,
    sync_ranks: bool = False,
) -> Rollout:
    """Sample `num_samples` responses per prompt (greedy when temperature == 0).

    With `seeds` (one per prompt), each response draws its randomness from its own generator, seeded by
    (prompt seed, sample index): the same prompt gets the same samples however the batch is split across
    ranks or micro-batches. Otherwise the whole batch shares `generator`.
    With `sync_ranks`, every data-parallel rank runs the same number of decoding steps (stopping only
    when all ranks are done), as sharded (FSDP) models need matching collectives on every rank.
    """
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
    device = next(model.parameters()).device
    ids = prompts.input_ids.to(device).repeat_interleave(num_samples, 0)  # (N, P)
    mask = prompts.attention_mask.to(device).repeat_interleave(num_samples, 0)
    n = ids.shape[0]
    was_training = model.training
    model.eval()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # The cache object is updated in place; keep it rather than reading it back from the output, whose
    # field is `cache` in recent transformers and `past_key_values` before 5.2x.
    from transformers import DynamicCache

    cache = {cache_keyword(model): DynamicCache(config=model.config)}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **cache)
    tokens, logps, alive_steps = [], [], []
    alive = torch.ones(n, dtype=torch.bool, device=device)
    next_pos = positions[:, -1:] + 1
    uniforms = None if seeds is None else per_row_uniforms(seeds, num_samples, max_new_tokens, device)
    for step in range(max_new_tokens):
        logits = out.logits[:, -1]  # (N, V)
        if temperature == 0:
            logp = torch.log_softmax(logits.float(), dim=-1)
            token = logp.argmax(-1)
        else:
            logp = sampling_logprobs(logits, temperature, top_p)
            if uniforms is None:
                token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
            else:
                token = inverse_cdf_sample(logp, uniforms[:, step])
        token = torch.where(alive, token, torch.full_like(token, pad_token_id))
        tokens.append(token)
        # where, not a product: a finished row's pad may lie outside the top-p set (log-prob -inf).
        logps.append(torch.where(alive, logp.gather(-1, token[:, None]).squeeze(-1), 0.0))
        alive_steps.append(alive.clone())
        alive &= token != eos_token_id
        still_running = all_reduce_sum(alive.sum()) if sync_ranks else alive.sum()
        if not still_running or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, alive_steps[-1][:, None].long()], dim=1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True, **cache)
        next_pos = next_pos + 1
    model.train(was_training)
    response = torch.stack(tokens, 1)  # (N, L)
    response_mask = torch.stack(alive_steps, 1)
    return Rollout(
        input_ids=torch.cat([ids, response], 1),
        attention_mask=torch.cat([prompts.attention_mask.to(device).repeat_interleave(num_samples, 0), response_mask.long()], 1),
        response_mask=response_mask,
        sampling_logp=torch.stack(logps, 1),
        prompt_len=ids.shape[1],
        answers=[a for a in prompts.answers for _ in range(num_samples)],
    )


def takes_argument(model: torch.nn.Module, name: str) -> bool:
    """Whether the model's forward declares `name` (read off its signature, behind any decorators)."""
    return name in inspect.signature(inspect.unwrap(model.forward)).parameters


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward keyword that takes a KV cache: `cache` (transformers >= 5.2x) or `past_key_values`.

    Recent versions still accept `past_key_values` with a deprecation warning, older 5.x ones know only it,
    so the name is read off the model's own signature instead of assumed.
    """
    return "cache" if takes_argument(model, "cache") else "past_key_values"


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of integers and strings (run seed, step, rank, stream index, a benchmark's
    name ...): every seed in opdlab that depends on more than one value is made here. The same in every process:
    a tuple of ints hashes deterministically, and strings are first turned into integers with blake2b (Python's
    own string hash is salted per process)."""
    return hash(tuple(stable_int(p) if isinstance(p, str) else int(p) for p in parts)) % (2**63)


def stable_int(text: str) -> int:
    """A 64-bit integer of a string, the same in every process and on every machine."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def per_row_uniforms(seeds: list[int], num_samples: int, length: int, device: torch.device) -> torch.Tensor:
    """(N, length) uniforms, row i*num_samples + j from a generator seeded by (seeds[i], j)."""
    rows = []
    for seed in seeds:
        for j in range(num_samples):
            gen = torch.Generator().manual_seed(derive_seed(int(seed), j))
            rows.append(torch.rand(length, generator=gen, dtype=torch.float64))
    return torch.stack(rows).to(device)


def inverse_cdf_sample(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Sample one token per row of (N, V) log-probs from (N,) uniforms; zero-probability tokens never win."""
    cdf = logp.double().exp().cumsum(-1)  # fp64: no drift over 150k-entry vocabularies
    target = (u * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=logp.shape[-1] - 1)


def decode_responses(tokenizer: PreTrainedTokenizerBase, rollout: Rollout) -> list[str]:
    """Response texts without special tokens or padding."""
    ids = rollout.response_ids.masked_fill(~rollout.response_mask, tokenizer.pad_token_id)
    return tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)
