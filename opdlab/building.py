"""Building the models a run trains: the student (weights, LoRA adapter, gradient checkpointing, FSDP2 sharding),
the limits read off its config, and the CPU thread count for small models.

`OPDModule.configure_model` calls these in order; nothing here holds state or knows the module.
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch.utilities import rank_zero_info

from opdlab.adapters import AdapterOptions, apply_adapter, is_adapted
from opdlab.models import load_causal_lm, resolve_model_path
from opdlab.options import MemoryOptions, RolloutOptions
from opdlab.sharding import shard_model

SMALL_MODEL_PARAMETERS = 50_000_000  # below this (student + teacher), one CPU thread: see choose_cpu_threads


def check_top_k(top_k: int, tokenizer, student_path: str) -> None:
    """The selector's K fits the vocabulary (checked before any weights load)."""
    if top_k > len(tokenizer):
        raise ValueError(f"selector top_k={top_k} exceeds the vocabulary ({len(tokenizer)} tokens of {student_path}); "
                         f"use top_k <= {len(tokenizer)}")


def check_engine_takes_adapter(engine, adapter: AdapterOptions) -> None:
    """A LoRA student needs a rollout engine that generates with the adapted student."""
    if adapter.enabled and not engine.loads_adapters:
        raise ValueError(f"student_adapter options need a rollout engine that generates with an adapted student; "
                         f"{type(engine).__name__} does not declare loads_adapters = True (see "
                         "opdlab.engines.RolloutEngine.loads_adapters): use --model.rollout_engine static, reference "
                         "or vllm, or drop the student_adapter options")


def build_student(path: str, memory: MemoryOptions, adapter: AdapterOptions, seed: int):
    """The trainable student in train mode: its weights in `memory.student_dtype`, with a new LoRA adapter when
    `adapter` is enabled (initialised from `seed`, the global RNG streams untouched) and gradient checkpointing
    when asked. Sharding comes later (`shard_student`), after the teacher is built on the same mesh."""
    student = load_causal_lm(path, memory.student_dtype)
    if adapter.enabled:  # before sharding: the adapter's layers are sharded with their decoder layer
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            apply_adapter(student, adapter, path)
    student.train()  # from_pretrained returns eval mode: dropout and checkpointing need train
    if memory.gradient_checkpointing:
        student.gradient_checkpointing_enable()
        if is_adapted(student):  # frozen embeddings: checkpointed blocks need an input that requires grad
            student.enable_input_require_grads()
    return student


def data_parallel_mesh(mesh):
    """The data-parallel part of a strategy's device mesh (ModelParallelStrategy: FSDP2 over it); None without."""
    if mesh is None:
        return None
    return mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh


def shard_student(student, mesh, memory: MemoryOptions) -> None:
    if mesh is not None and memory.shard_student:
        shard_model(student, mesh)


def position_limit(model) -> int | None:
    """The model's `max_position_embeddings` (None when its config has none)."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def max_sequence_len(student_path: str, rollout: RolloutOptions) -> int:
    """The longest prompt + response this run can send the teacher, read off the student's config (no weights)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(student_path))
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    return min(rollout.max_prompt_len + rollout.max_new_tokens, limit or 2**31)


def check_positions(student, rollout: RolloutOptions, student_path: str) -> None:
    """A response limit beyond the student's position limit is refused before any weights are used (prompts
    that with their response run past it are warned about when they come: `RunWarnings.past_positions`)."""
    limit = position_limit(student)
    if limit is not None and rollout.max_new_tokens >= limit:
        raise ValueError(f"rollout.max_new_tokens={rollout.max_new_tokens} does not fit the student's "
                         f"{limit} positions ({student_path}: max_position_embeddings); use fewer than {limit}")


def choose_cpu_threads(models: list, device: torch.device) -> int:
    """On a CPU, for small models and when OMP_NUM_THREADS is not set: one torch thread. Reproducible and robust
    rather than fastest: the thread count changes the rounding (and so the trained result) on some CPUs, and while
    on an idle 2-core machine two threads train the toy ~1.5x faster, with one or two other jobs on the machine they
    are 2-3.3x slower (each small product waits for a busy core; benchmarks/results/cpu_threads.md). Set
    OMP_NUM_THREADS to choose yourself (it is then left alone). Returns the torch thread count in use."""
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    total = sum(p.numel() for m in models if m is not None for p in m.parameters())
    if total < SMALL_MODEL_PARAMETERS and torch.get_num_threads() != 1:
        rank_zero_info(f"opdlab: CPU with small models ({total / 1e6:.1f}M parameters): 1 torch thread instead of "
                       f"{torch.get_num_threads()} (steady on a shared machine; set OMP_NUM_THREADS to choose)")
        torch.set_num_threads(1)
    return torch.get_num_threads()
