"""Rollout engines: the interface and the built-ins (entry-point group `opdlab.rollout_engines`).

Public API (docs/api.md): the names in `__all__`, importable from `opdlab.engines`.
"""

from opdlab.engines.base import RolloutEngine, SamplingParams
from opdlab.rollout import PromptBatch, Rollout, sampling_logprobs
from opdlab.engines.reference import ReferenceEngine
from opdlab.engines.static import StaticCacheEngine
from opdlab.engines.vllm_engine import VLLMEngine  # vllm itself is imported only when an engine is built

__all__ = [
    "PromptBatch", "ReferenceEngine", "Rollout", "RolloutEngine", "SamplingParams", "StaticCacheEngine", "VLLMEngine",
    "sampling_logprobs",
]
