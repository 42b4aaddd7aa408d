"""The fast engine: a generation copy of the student, a static KV cache, and one decode step replayed.

Where the reference loop grows a dynamic cache and its mask by `torch.cat` every step and runs the model
eagerly (about 38 ms per decode step for a 0.6B model on an H200, almost all of it Python and kernel
launches), this engine keeps every tensor of a rollout at a fixed shape and address:

- `StaticKVCache`: keys/values preallocated as (N, kv_heads, S, head_dim) per layer, S = prompt width
  (rounded up to a power of two, so ragged prompts reuse a few shapes) + max_new_tokens; a step writes
  its slot in place. The attention mask is built on the device from the step counter, not concatenated.
- `decode_step`: one token for every row, written as tensor code without host synchronisation: the
  previous token is read from the output buffer, sampling is inverse-CDF with per-row uniforms drawn
  once per rollout (counter-based: row seed, step), finished rows are masked with `torch.where`. On
  CUDA it is compiled with `torch.compile(mode="reduce-overhead")`, i.e. captured as a CUDA graph once
  per shape and replayed; whether all rows have finished is checked only every `stop_check_interval`
  steps (the only host sync of the loop).
- The generation copy holds the student's weights in the compute dtype (bfloat16 under bf16-mixed);
  `load_weights` copies the master weights into the same storage after every optimizer step (graphs
  are captured on those addresses), gathering full tensors from a sharded (FSDP2) student. A student with a
  LoRA adapter is copied merged (base + adapter: `opdlab.adapters.plain_parameters`), so the copy runs
  the plain architecture at the same speed.

The sampled tokens and their log-probabilities follow the same rules as the reference loop (the same
`sampling_logprobs`, the same per-row uniforms when seeds are given), so the two agree token for token
in float32 up to floating-point ties. The copy attends with its own SDPA function (`ATTENTION`, the
engine's bool mask, grouped-query heads in the kernel); models whose attention that would get wrong
(sliding windows, logit soft-capping) are refused with a pointer to the reference engine.
"""

from __future__ import annotations

import warnings
from copy import deepcopy
from dataclasses import dataclass

import torch
from torch import nn

from opdlab.adapters import full, plain_parameters
from opdlab.engines.base import RolloutEngine, SamplingParams, generation_dtype
from opdlab.models import DTYPES
from opdlab.rollout import (
    PromptBatch,
    Rollout,
    cache_keyword,
    inverse_cdf_sample,
    per_row_uniforms,
    sampling_logprobs,
    takes_argument,
)

DEFAULT_COMPILE_OPTIONS = {"mode": "reduce-overhead", "fullgraph": True, "dynamic": False}


class StaticKVCache:
    """Keys/values of every layer at fixed addresses: (N, kv_heads, S, head_dim) each.

    HF attention layers call `update(key, value, layer_idx, ...)` and attend over what it returns; this
    writes the new states at `positions` ((q,) long: `arange(P)` in prefill, the one-slot `decode_slot`
    while decoding). It is duck-typed rather than a `transformers.Cache` subclass: that class's internals
    change between 5.x releases, the attention layers' call does not.
    """

    is_compileable = True

    def __init__(self, length: int, device: torch.device) -> None:
        self.length = length
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.decode_slot = torch.zeros(1, dtype=torch.long, device=device)
        self.positions = self.decode_slot
        self.visible: int | None = None  # eager decoding attends to the filled slots only (None: all S)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx not in self.keys:  # allocated in the (eager) prefill, before anything is compiled
            n, heads, _, _ = key_states.shape
            self.keys[layer_idx] = key_states.new_zeros(n, heads, self.length, key_states.shape[-1])
            self.values[layer_idx] = value_states.new_zeros(n, heads, self.length, value_states.shape[-1])
            torch._dynamo.mark_static_address(self.keys[layer_idx])
            torch._dynamo.mark_static_address(self.values[layer_idx])
        self.keys[layer_idx].index_copy_(2, self.positions, key_states)
        self.values[layer_idx].index_copy_(2, self.positions, value_states)
        end = self.visible or self.length
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise NotImplementedError("StaticKVCache needs explicit position_ids")


@dataclass
class DecodeBuffers:
    """Every buffer of one rollout shape: rows N, prompt width P (padded), max_new_tokens T."""

    rows: int
    prompt_width: int
    max_new_tokens: int
    cache: StaticKVCache
    kv_index: torch.Tensor  # (S,) 0..S-1
    prompt_valid: torch.Tensor  # (N, S) bool: real prompt tokens
    first_position: torch.Tensor  # (N, 1) position id of the first response token
    uniforms: torch.Tensor  # (N, T) float64
    alive: torch.Tensor  # (N,) bool: has not emitted EOS yet
    step: torch.Tensor  # () long: index of the response token the next decode step samples
    tokens: torch.Tensor  # (N, T) long
    logps: torch.Tensor  # (N, T) float32
    valid: torch.Tensor  # (N, T) bool

    @classmethod
    def allocate(cls, rows: int, prompt_width: int, max_new_tokens: int, device: torch.device) -> DecodeBuffers:
        length = prompt_width + max_new_tokens
        zeros = lambda *shape, dtype: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        ws = cls(
            rows, prompt_width, max_new_tokens, StaticKVCache(length, device),
            kv_index=torch.arange(length, device=device), prompt_valid=zeros(rows, length, dtype=torch.bool),
            first_position=zeros(rows, 1, dtype=torch.long), uniforms=zeros(rows, max_new_tokens, dtype=torch.float64),
            alive=zeros(rows, dtype=torch.bool), step=zeros((), dtype=torch.long),
            tokens=zeros(rows, max_new_tokens, dtype=torch.long), logps=zeros(rows, max_new_tokens, dtype=torch.float32),
            valid=zeros(rows, max_new_tokens, dtype=torch.bool),
        )
        for buffer in (ws.cache.decode_slot, ws.kv_index, ws.prompt_valid, ws.first_position, ws.uniforms,
                       ws.alive, ws.step, ws.tokens, ws.logps, ws.valid):
            torch._dynamo.mark_static_address(buffer)  # mutated in place by the captured step
        return ws


@dataclass(frozen=True)
class StepConstants:
    """What a compiled decode step specialises on (one graph per distinct value)."""

    cache_keyword: str
    cache_position: bool  # the forward takes `cache_position` (transformers < 5.2x): pass the written slots
    temperature: float
    top_p: float
    eos_token_id: int
    pad_token_id: int


def sample_next(logits: torch.Tensor, uniforms: torch.Tensor, c: StepConstants) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) logits, (N,) uniforms -> sampled token (N,) and its log-prob under the sampling distribution.

    The same draws as the reference loop's `inverse_cdf_sample(sampling_logprobs(...), u)`, computed without
    materialising the (N, V) log-softmax where top-p is off: the inverse CDF of exp(z - max) scaled by its
    total is the one of the normalised distribution, and only the sampled column's log-prob is needed.
    """
    z = logits.float() if c.temperature in (0, 1) else logits.float() / c.temperature
    if c.top_p < 1 and c.temperature > 0:
        logp = sampling_logprobs(logits, c.temperature, c.top_p)
        token = inverse_cdf_sample(logp, uniforms)
        return token, logp.gather(-1, token[:, None]).squeeze(-1)
    top = z.max(-1, keepdim=True).values  # (N, 1)
    if c.temperature == 0:
        token = z.argmax(-1)
        total = (z - top).exp().sum(-1, keepdim=True)
    else:
        cdf = (z - top).double().exp().cumsum(-1)  # fp64: no drift over 150k-entry vocabularies
        total = cdf[:, -1:]
        token = torch.searchsorted(cdf, uniforms[:, None] * total, right=True).squeeze(-1).clamp(max=z.shape[-1] - 1)
    logp = z.gather(-1, token[:, None]) - top - total.log().float()
    return token, logp.squeeze(-1)


def record(ws: DecodeBuffers, token: torch.Tensor, logp: torch.Tensor, c: StepConstants) -> None:
    """Write response token `ws.step` of every row (pad after EOS) and advance the step counter."""
    at = ws.step.view(1)
    token = torch.where(ws.alive, token, torch.full_like(token, c.pad_token_id))
    # where, not a product: a finished row's pad may lie outside the top-p set (log-prob -inf).
    ws.logps.index_copy_(1, at, torch.where(ws.alive, logp, 0.0)[:, None])
    ws.valid.index_copy_(1, at, ws.alive[:, None])
    ws.tokens.index_copy_(1, at, token[:, None])
    ws.alive &= token != c.eos_token_id
    ws.step += 1


ATTENTION = "opdlab_static_cache"


def static_cache_attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The generation copy's attention: SDPA over the cache with the engine's (N, 1, q, S) bool mask and
    grouped-query heads handled by the kernel (`enable_gqa`), not by copying keys per query head (HF's
    masked path copies or reshapes them: 3.6x slower per decode call on CPU, and under compile it repeats
    the whole cache every step)."""
    groups = getattr(module, "num_key_value_groups", 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=groups > 1,
    )
    return out.transpose(1, 2).contiguous(), None


def cache_arguments(cache: StaticKVCache, slots: torch.Tensor, c: StepConstants) -> dict:
    """The cache keyword arguments of a forward writing `slots`: older 5.x releases also take the cache
    positions (else they ask the cache for its length to make them)."""
    return {c.cache_keyword: cache, **({"cache_position": slots} if c.cache_position else {})}


def decode_step(model: nn.Module, ws: DecodeBuffers, c: StepConstants, visible: int | None = None) -> None:
    """Feed response token step-1 of every row, sample token `step`; no host sync.

    Compiled, every shape is fixed (`visible` None: attention spans all S cache slots, masked). Eager
    (CPU), `visible` = the filled slots: attending to the empty tail would only cost time there.
    """
    previous = ws.step - 1
    fed = ws.tokens.index_select(1, previous.view(1))  # (N, 1)
    slot = ws.prompt_width + previous
    ws.cache.decode_slot.copy_(slot.view(1))
    ws.cache.visible = visible
    kv_index, prompt_valid = ws.kv_index[:visible], ws.prompt_valid[:, :visible]
    generated = (kv_index >= ws.prompt_width) & (kv_index <= slot)  # (S,)
    allowed = (prompt_valid | generated)[:, None, None, :]  # (N, 1, 1, S)
    logits = model(
        input_ids=fed, attention_mask=allowed, position_ids=ws.first_position + previous, use_cache=True,
        **cache_arguments(ws.cache, ws.cache.decode_slot, c),
    ).logits[:, -1]
    token, logp = sample_next(logits, ws.uniforms.index_select(1, ws.step.view(1)).squeeze(1), c)
    record(ws, token, logp, c)


class StaticCacheEngine(RolloutEngine):
    """Static-shape rollouts, compiled and replayed on CUDA (see the module docstring).

    Args:
        dtype: weights of the generation copy: `auto` (the compute dtype where the copy is first built:
            autocast's under mixed precision, e.g. bfloat16 with `bf16-mixed`, else the student's own),
            `float32`, `bfloat16` or `float16`.
        compile: compile the decode step (`None`: only on CUDA, where it is captured as a CUDA graph).
        compile_options: keyword arguments of `torch.compile` (default: mode `reduce-overhead`,
            fullgraph, static shapes). If compilation fails the engine warns once and runs eagerly.
        stop_check_interval: decode steps between checks whether every row has finished (each check
            waits for the GPU). `None`: every step on CPU (free there), every 8 steps on CUDA; the extra
            steps after the last EOS are trimmed from the rollout.
        min_prompt_bucket: prompts are left-padded to the next power of two at least this wide, so that
            ragged prompt lengths share a few cache shapes (each new shape is one more graph).
        max_workspaces: rollout shapes (rows, prompt width, length) whose buffers are kept (e.g. training
            and validation); the least recently used beyond this are freed.
    """

    loads_adapters = True

    def __init__(
        self,
        dtype: str = "auto",
        compile: bool | None = None,
        compile_options: dict | None = None,
        stop_check_interval: int | None = None,
        min_prompt_bucket: int = 16,
        max_workspaces: int = 4,
    ) -> None:
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
        for name, value in (("stop_check_interval", stop_check_interval), ("min_prompt_bucket", min_prompt_bucket),
                            ("max_workspaces", max_workspaces)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.dtype, self.compile, self.stop_check_interval = dtype, compile, stop_check_interval
        self.compile_options = dict(DEFAULT_COMPILE_OPTIONS if compile_options is None else compile_options)
        self.min_prompt_bucket, self.max_workspaces = min_prompt_bucket, max_workspaces
        self.copy: nn.Module | None = None
        self.workspaces: dict[tuple, DecodeBuffers] = {}
        self.step_fn = None

    # ------------------------------------------------------------------------- weights
    def bind(self, model: nn.Module, eos_token_id: int, pad_token_id: int) -> None:
        super().bind(model, eos_token_id, pad_token_id)
        self.copy, self.workspaces, self.step_fn = None, {}, None  # a new student: a new copy at next load

    def load_weights(self, model: nn.Module) -> None:
        if self.copy is None:
            self.copy = self.build_copy(model)
        targets = dict(self.copy.named_parameters(remove_duplicate=False))  # a tied head under both names
        with torch.no_grad():
            for name, tensor in plain_parameters(model):  # one whole (merged) tensor at a time
                targets[name].copy_(tensor)

    def build_copy(self, model: nn.Module) -> nn.Module:
        """An eval-mode twin of `model` in the generation dtype, on its device; buffers copied once."""
        check_supported(model)
        device = next(model.parameters()).device
        dtype = self.generation_dtype(model, device)
        from transformers import AttentionInterface  # here, not at import: `opdlab plugins` stays fast

        AttentionInterface.register(ATTENTION, static_cache_attention)  # idempotent
        with torch.device("meta"):
            copy = type(model)(deepcopy(model.config))  # its own config: the attention choice stays here
        copy.config._attn_implementation = ATTENTION
        copy.to_empty(device=device)
        copy.tie_weights()  # to_empty gives every parameter new storage; re-tie a tied head
        for param in copy.parameters():  # tied weights are one parameter: converted once
            param.data = param.data.to(dtype)
        sources = dict(model.named_buffers(remove_duplicate=False))
        with torch.no_grad():
            for name, buffer in copy.named_buffers():  # e.g. rotary inv_freq: kept in its own dtype
                buffer.data = full(sources[name]).clone()
        return copy.eval().requires_grad_(False)

    def generation_dtype(self, model: nn.Module, device: torch.device) -> torch.dtype:
        """`auto`: the dtype the student computes in here: autocast's (bf16-mixed training) or its own."""
        return generation_dtype(self.dtype, model, device)

    # ------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, prompts: PromptBatch, params: SamplingParams) -> Rollout:
        if self.copy is None:
            self.load_weights(self.model)
        model = self.copy
        device = next(model.parameters()).device
        ids = prompts.input_ids.to(device).repeat_interleave(params.num_samples, 0)  # (N, P)
        mask = prompts.attention_mask.to(device).repeat_interleave(params.num_samples, 0)
        rows, width = ids.shape
        step, compiled = self.decode_fn(device)
        # Compiled graphs need few shapes: pad prompts to a power of two. Eager decoding needs none.
        ws = self.workspace(rows, self.bucket(width) if compiled else width, params.max_new_tokens, device)
        constants = StepConstants(
            cache_keyword(model), takes_argument(model, "cache_position"), params.temperature, params.top_p,
            self.eos_token_id, self.pad_token_id,
        )
        self.prefill(model, ws, ids, mask, self.uniforms(params, rows, device), constants)
        produced = 1
        interval = self.stop_check_interval or (8 if device.type == "cuda" else 1)
        while produced < params.max_new_tokens:
            if produced % interval == 0 and not bool(ws.alive.any()):
                break
            if compiled and device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            step(model, ws, constants, None if compiled else ws.prompt_width + produced)
            produced += 1
        length = max(int(ws.valid[:, :produced].sum(1).max()), 1)
        response, valid = ws.tokens[:, :length].clone(), ws.valid[:, :length].clone()
        return Rollout(
            input_ids=torch.cat([ids, response], 1),
            attention_mask=torch.cat([mask, valid.long()], 1),
            response_mask=valid,
            sampling_logp=ws.logps[:, :length].clone(),
            prompt_len=width,
            answers=[a for a in prompts.answers for _ in range(params.num_samples)],
        )

    def prefill(self, model, ws: DecodeBuffers, ids, mask, uniforms, c: StepConstants) -> None:
        """Run the (left-padded) prompts eagerly, fill the cache, sample response token 0."""
        rows, width = ids.shape
        pad = ws.prompt_width - width
        ids = torch.nn.functional.pad(ids, (pad, 0), value=self.pad_token_id)
        mask = torch.nn.functional.pad(mask, (pad, 0), value=0).bool()
        ws.prompt_valid.zero_()
        ws.prompt_valid[:, : ws.prompt_width] = mask
        ws.first_position.copy_(mask.sum(1, keepdim=True))
        ws.uniforms.copy_(uniforms)
        ws.alive.fill_(True)
        ws.step.zero_()
        ws.valid.zero_()
        query = ws.kv_index[: ws.prompt_width]
        causal = query[None, :] <= query[:, None]  # (P, P): the prompt attends to the prompt only
        own = query[None, :] == query[:, None]  # a padding query attends to itself: no empty rows
        allowed = causal & (mask[:, None, :] | own)  # (N, P, P)
        ws.cache.positions, ws.cache.visible = query, ws.prompt_width
        logits = model(
            input_ids=ids, attention_mask=allowed[:, None],
            position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0), use_cache=True,
            # The last position by index, not by slice: the gathered (N, 1, H) rows are contiguous. A sliced
            # view with a no-grad weight sends torch's matmul to a bmm over an (N, H, V) expanded weight
            # (90 ms instead of 10 at V = 151,936 on CPU).
            logits_to_keep=query[-1:], **cache_arguments(ws.cache, query, c),
        ).logits[:, -1]
        ws.cache.positions = ws.cache.decode_slot
        token, logp = sample_next(logits, ws.uniforms[:, 0], c)
        record(ws, token, logp, c)

    def uniforms(self, params: SamplingParams, rows: int, device: torch.device) -> torch.Tensor:
        """(N, T) uniforms of the whole rollout: per row from its seed, else from the batch generator."""
        if params.greedy:
            return torch.zeros(rows, params.max_new_tokens, dtype=torch.float64, device=device)
        if params.seeds is not None:
            return per_row_uniforms(params.seeds, params.num_samples, params.max_new_tokens, device)
        generator = params.generator
        gen_device = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(rows, params.max_new_tokens, generator=generator, dtype=torch.float64, device=gen_device)
        return u.to(device)

    def bucket(self, width: int) -> int:
        """The padded prompt width: the next power of two >= max(width, min_prompt_bucket)."""
        return 1 << (max(width, self.min_prompt_bucket) - 1).bit_length()

    def workspace(self, rows: int, prompt_width: int, max_new_tokens: int, device: torch.device) -> DecodeBuffers:
        key = (rows, prompt_width, max_new_tokens, str(device))
        ws = self.workspaces.pop(key, None) or DecodeBuffers.allocate(rows, prompt_width, max_new_tokens, device)
        self.workspaces[key] = ws  # most recently used last
        while len(self.workspaces) > self.max_workspaces:
            self.workspaces.pop(next(iter(self.workspaces)))
        return ws

    def decode_fn(self, device: torch.device):
        """(the decode step, whether it is compiled): compiled on first use where compilation is on
        (CUDA by default)."""
        if self.step_fn is None:
            self.step_fn = decode_step
            if self.compile or (self.compile is None and device.type == "cuda"):
                # One graph per (rows, prompt bucket, length, sampling settings): training and validation
                # with a few prompt buckets can pass dynamo's default of 8, after which it would silently
                # decode new shapes eagerly.
                limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
                setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
                self.step_fn = self.compiled(torch.compile(decode_step, **self.compile_options))
        return self.step_fn, self.step_fn is not decode_step

    def compiled(self, fn):
        """Run the compiled step; on a compile error, warn once and fall back to the eager step for good."""
        def run(model, ws, c, visible=None):
            if self.step_fn is decode_step:  # fell back earlier in this rollout
                return decode_step(model, ws, c)
            try:
                return fn(model, ws, c)
            except Exception as err:  # noqa: BLE001 - any compiler failure (raised while tracing, before ws changes)
                warnings.warn(f"StaticCacheEngine: compiling the decode step failed ({type(err).__name__}: "
                              f"{err}); decoding eagerly from now on (set compile: false to skip the attempt)",
                              stacklevel=2)
                self.step_fn = decode_step
                return decode_step(model, ws, c)
        return run


def check_supported(model: nn.Module) -> None:
    """Refuse models whose attention the engine's plain causal SDPA would silently get wrong."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layer_types = set(getattr(config, "layer_types", None) or [])
    special = [name for name in ("attn_logit_softcapping", "sliding_window") if getattr(config, name, None)
               and (name != "sliding_window" or getattr(config, "use_sliding_window", True))]
    if layer_types - {"full_attention"} or special:
        raise ValueError(
            f"StaticCacheEngine runs plain causal attention; {type(model).__name__} has "
            f"{sorted(layer_types - {'full_attention'}) or special}: use --model.rollout_engine reference"
        )
