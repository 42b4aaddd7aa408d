"""Rollout engines: the interface and the built-ins (entry-point group `opdlab.rollout_engines`)."""

from opdlab.engines.base import RolloutEngine, SamplingParams
from opdlab.engines.reference import ReferenceEngine
from opdlab.engines.static import StaticCacheEngine
from opdlab.engines.vllm_engine import VLLMEngine  # vllm itself is imported only when an engine is built

__all__ = ["RolloutEngine", "SamplingParams", "ReferenceEngine", "StaticCacheEngine", "VLLMEngine"]
