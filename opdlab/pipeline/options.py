"""`PipelineOptions`: bounded-staleness asynchronous rollouts (`--model.pipeline.*`; docs/runs.md, "Asynchronous
rollouts")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

PRODUCERS = ("process", "inline", "vllm_fleet")


@dataclass
class PipelineOptions:
    """Generate the rollouts of the next steps while this step trains, never more than `max_staleness` optimizer
    steps old when trained on.

    Args:
        max_staleness: N. 0 (default) is the synchronous loop: each step samples its rollouts with the weights it
            trains (bit-identical to opdlab before the pipeline). With N >= 1 the rollout trained at step t was
            sampled with the weights of step max(t - N, first step of the fit) ("N-step-off", as AsyncOPD's
            bounded mode): the producer runs N steps ahead and waits for those weights (admission control), oldest
            first, and no finished rollout is discarded.
        producer: where the rollouts of the next steps are generated: `process` (a worker process with its own copy
            of the student and the rollout engine; the trainable weights reach it through shared memory after
            every optimizer step), `inline` (this process, right after each optimizer step: no overlap, the same
            rollouts and losses as `process`; for studies and tests), or `vllm_fleet` (OpenAI-compatible vLLM
            servers at `urls`, which take each new policy's weights; docs/runs.md).
        producer_threads: CPU threads of the `process` producer (torch intra-op threads; 1 by default, so that on a
            2-core machine the trainer keeps the other core).
        producer_device: the device the `process` producer generates on (default: the student's device).
        urls: the `vllm_fleet` servers (`http://host:port/v1`), one data-parallel fleet: each step's prompts are
            split across them.
        timeout: seconds a producer may take for one step's rollouts (and a server for one request or weight
            update) before the fit ends naming the step.
    """

    max_staleness: int = 0
    producer: Literal["process", "inline", "vllm_fleet"] = "process"
    producer_threads: int = 1
    producer_device: str | None = None
    urls: list[str] = field(default_factory=list)
    timeout: float = 600.0

    def __post_init__(self) -> None:
        if isinstance(self.max_staleness, bool) or not isinstance(self.max_staleness, int) or self.max_staleness < 0:
            raise ValueError(f"pipeline.max_staleness must be an integer >= 0 (0: synchronous), got "
                             f"{self.max_staleness!r}")
        if self.producer not in PRODUCERS:
            raise ValueError(f"pipeline.producer must be one of {', '.join(PRODUCERS)}, got {self.producer!r}")
        if isinstance(self.producer_threads, bool) or not isinstance(self.producer_threads, int) \
                or self.producer_threads < 1:
            raise ValueError(f"pipeline.producer_threads must be an integer >= 1, got {self.producer_threads!r}")
        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0 and self.timeout < float("inf")):
            raise ValueError(f"pipeline.timeout must be a finite number of seconds > 0, got {self.timeout!r}")
        if self.producer_device is not None:
            import torch

            try:
                torch.device(self.producer_device)
            except (RuntimeError, TypeError, ValueError):
                raise ValueError(f"pipeline.producer_device must be a torch device (cpu, cuda, cuda:1 ...), got "
                                 f"{self.producer_device!r}") from None
        self.urls = list(self.urls or [])
        bad = [u for u in self.urls if not isinstance(u, str) or not u.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"pipeline.urls must be http(s) URLs of OpenAI-compatible servers (http://host:port/v1), "
                             f"got {bad[0]!r}")
        if self.producer == "vllm_fleet" and self.max_staleness >= 0 and not self.urls:
            raise ValueError("pipeline.producer vllm_fleet needs pipeline.urls (one or more http://host:port/v1 of "
                             "vLLM servers serving the student); see docs/runs.md")
        if self.urls and self.producer != "vllm_fleet":
            raise ValueError(f"pipeline.urls is for pipeline.producer vllm_fleet, got producer {self.producer!r}; "
                             "set --model.pipeline.producer vllm_fleet or drop the URLs")
        if len(set(self.urls)) != len(self.urls):
            raise ValueError(f"pipeline.urls lists a server twice: {self.urls}")

    @property
    def synchronous(self) -> bool:
        return self.max_staleness == 0 and self.producer != "vllm_fleet"
