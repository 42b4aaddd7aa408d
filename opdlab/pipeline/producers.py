"""Rollout producers: what generates the rollouts of later steps for `RolloutPipeline`.

A producer takes jobs (one step's prompts, their sampling seeds and the policy version to sample with) in order and
returns each job's `Produced` rollout. `publish(version, student)` hands it the weights of a new policy version after
an optimizer step; it returns once the producer can no longer need the previous weights, so that the next version
may replace them. A producer never generates a job with weights other than the version the job names, and says which
version it used: the pipeline refuses a rollout whose version is not the job's.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace

import torch

from opdlab.engines import SamplingParams
from opdlab.rollout import PromptBatch, Rollout


class PipelineError(RuntimeError):
    """The rollout pipeline cannot go on (a producer died or failed, a server answered for other weights ...): one
    line naming the producer and the step; checkpoints already written are intact."""


@dataclass
class Job:
    """One training step's rollouts to generate: `index` counts this fit's jobs from 0, `step` is the optimizer step
    (global step) it is meant for, `version` the policy version (optimizer steps applied) to sample with."""

    index: int
    step: int
    version: int
    batch: dict
    prompts: PromptBatch
    params: SamplingParams  # with generator None: `generator_seed` makes one where the job runs
    generator_seed: int

    def sampling(self, device: torch.device | str) -> SamplingParams:
        return replace(self.params, generator=torch.Generator(device=device).manual_seed(self.generator_seed))

    def wire(self) -> Job:
        """This job without what does not cross a process boundary (the params' generator)."""
        return replace(self, params=replace(self.params, generator=None))


@dataclass
class Produced:
    """A job's rollouts, the version of the weights that sampled them, and when (`time.perf_counter()` seconds:
    one clock for every process of the machine)."""

    job: Job
    rollout: Rollout
    version: int
    start: float
    seconds: float
    worker: str = "producer"
    pending: object | None = field(default=None, repr=False)  # the teacher's request, made as soon as it exists


@dataclass
class ProducerContext:
    """What a producer may use: the module's sampler (the in-process engine), student and options."""

    module: object  # OPDModule (typed loosely: the module imports this package)
    where: object  # () -> str, the stage name for messages
    finish: object  # (Produced) -> Produced: on the student's device, the teacher asked; called as each one exists


class RolloutProducer(ABC):
    name: str = "producer"
    overlaps: bool = True  # generation runs while the trainer trains

    def start(self, context: ProducerContext) -> None:
        self.context = context

    @abstractmethod
    def publish(self, version: int, student: torch.nn.Module) -> None:
        """The weights of policy `version` (after an optimizer step); returns when older weights are no longer
        needed by any submitted job."""

    @abstractmethod
    def submit(self, job: Job) -> None:
        """Queue `job` (its `version` is the last one published)."""

    @abstractmethod
    def result(self, index: int, timeout: float) -> Produced:
        """Job `index`'s rollouts, waiting up to `timeout` seconds; a `PipelineError` if it cannot come."""

    def close(self) -> None:
        """Stop (idempotent; called on success, failure and Ctrl-C)."""


class InlineProducer(RolloutProducer):
    """Generates each job in this process when it is submitted, with the module's own engine and the current weights
    (which are the job's version: a job is submitted right after its version is published). No overlap: the same
    rollouts and losses as `process`, for studies of staleness and for tests."""

    name = "inline"
    overlaps = False

    def __init__(self) -> None:
        self.done: dict[int, Produced] = {}
        self.version = None

    def publish(self, version: int, student: torch.nn.Module) -> None:
        self.version = version  # the module's sampler reloads the engine's weights after every optimizer step

    def submit(self, job: Job) -> None:
        if job.version != self.version:
            raise PipelineError(f"inline producer: job for step {job.step + 1} names policy version {job.version} "
                                f"but this process holds version {self.version}")
        module = self.context.module
        start = time.perf_counter()
        with module.trainer.precision_plugin.train_step_context():  # as the synchronous loop samples (bf16-mixed ...)
            rollout = module.sampler.generate(job.prompts, job.sampling(module.device))
        seconds = time.perf_counter() - start
        self.done[job.index] = self.context.finish(Produced(job, rollout, self.version, start, seconds, "inline"))

    def result(self, index: int, timeout: float) -> Produced:
        try:
            return self.done.pop(index)
        except KeyError:
            raise PipelineError(f"inline producer: no rollouts for job {index} (jobs held: "
                                f"{sorted(self.done)})") from None

    def close(self) -> None:
        self.done.clear()
