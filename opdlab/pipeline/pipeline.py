"""`RolloutPipeline`: the rollouts of the next steps, generated while this step trains, with bounded staleness.

The schedule ("N-step-off", docs/method.md §6): with `max_staleness` N, the fit's first N + 1 jobs are submitted
with the weights of its first step; after every step (stepped or skipped) the weights are published and one more
job is submitted with them. The rollouts trained at step t were therefore sampled with the policy of step
max(t - N, first), at most N optimizer steps old. A job is only admitted once its weights exist (the producer
waits, admission control), jobs are trained in the order they were read (oldest first), and no finished rollout is
dropped: a checkpoint saves the rollouts in flight and a resumed run trains them (exact resume).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from opdlab.pipeline.options import PipelineOptions
from opdlab.pipeline.producers import Job, PipelineError, Produced, ProducerContext, RolloutProducer
from opdlab.rollout import Rollout


@dataclass
class Taken:
    """What the trainer got for one step: the rollouts, how stale they are and how long it waited."""

    produced: Produced
    staleness: int
    waited: float


class RolloutPipeline:
    def __init__(self, options: PipelineOptions, producer: RolloutProducer) -> None:
        self.options, self.producer = options, producer
        self.jobs: deque[Job] = deque()  # submitted, not yet trained, oldest first
        self.ready: dict[int, Produced] = {}  # finished (and restored) jobs' rollouts
        self.next_index = 0
        self.restored: dict | list[dict] = []  # a checkpoint's rollouts in flight (its state, then this rank's)
        self.batches: Iterator[dict] | None = None
        self.max_steps: int | None = None  # the run's last step: no job is submitted for a step past it
        self.version: int | None = None
        self.started = False
        self.waited = 0.0  # seconds the trainer waited for rollouts, this fit

    @property
    def max_staleness(self) -> int:
        return self.options.max_staleness

    # ----------------------------------------------------------------------------- schedule
    def begin(self, module, finish: Callable[[Produced], Produced]) -> None:
        """Start the producer, restore a checkpoint's rollouts in flight, read ahead and submit the first N + 1 jobs."""
        self.module, self.finish = module, finish
        datamodule = getattr(module.trainer, "datamodule", None)
        if not hasattr(datamodule, "read_ahead"):
            raise PipelineError(f"--model.pipeline.max_staleness {self.max_staleness} (or a rollout fleet) needs a data "
                                "module that can read its training batches ahead (opdlab.data.PromptDataModule or a "
                                f"subclass); got {type(datamodule).__name__}")
        self.restored = self.this_ranks(self.restored, module)
        for position, saved in enumerate(self.restored):  # before the producer starts: refused at once
            oldest = module.global_step + position - int(saved["version"])
            if oldest > self.max_staleness:
                raise PipelineError(f"the checkpoint's rollouts in flight for step {module.global_step + position + 1} "
                                    f"were sampled {oldest} optimizer steps before it (policy version "
                                    f"{saved['version']}), more than --model.pipeline.max_staleness "
                                    f"{self.max_staleness}: resume with max_staleness >= "
                                    f"{state_staleness(self.restored, module.global_step)}, as the run was saved")
        self.producer.start(ProducerContext(module, module.stage_name, finish))
        self.version = module.global_step
        self.producer.publish(self.version, module.student)
        max_steps = module.trainer.max_steps
        self.max_steps = max_steps if max_steps and max_steps > 0 else None
        for saved in self.restored:
            self.restore(saved)
        self.batches = datamodule.read_ahead(skip_batches=len(self.restored))
        self.restored = []
        self.started = True
        while len(self.jobs) < self.max_staleness + 1 and self.submit_next():
            pass

    def submit_next(self) -> bool:
        """Submit the next batch's job with the current weights; False when the run or the data has no more. The run
        trains until `max_steps` updates: a skipped (non-finite) step does not count, so it takes one batch more."""
        if self.max_steps is not None and self.module.global_step + len(self.jobs) >= self.max_steps:
            return False
        batch = next(self.batches, None)
        if batch is None:
            return False
        module, index = self.module, self.next_index
        step = module.global_step + len(self.jobs)
        job = Job(index=index, step=step, version=self.version, batch=batch, prompts=module.encode(batch),
                  params=module.sampling_params(batch), generator_seed=module.generator_seed(step))
        self.jobs.append(job)
        self.next_index += 1
        self.producer.submit(job)
        return True

    def take(self, batch: dict, module) -> Taken:
        """The rollouts for this step's `batch` (the oldest job), waiting for the producer if it is behind."""
        start = time.perf_counter()
        if not self.started:
            raise PipelineError("rollout pipeline: a training step before the pipeline began (OPDModule.on_train_start "
                                "begins it)")
        if not self.jobs:
            raise PipelineError(f"rollout pipeline: no job for step {module.global_step + 1} (the run asked for more "
                                f"steps than it read ahead: {self.next_index} jobs)")
        job = self.jobs[0]
        check_same_batch(batch, job.batch, module.global_step + 1)
        produced = self.ready.pop(job.index, None) or self.producer.result(job.index, self.options.timeout)
        self.jobs.popleft()
        if produced.version != job.version:
            raise PipelineError(f"{self.producer.name} producer: the rollouts for step {module.global_step + 1} were "
                                f"sampled with policy version {produced.version}, the job named {job.version}; "
                                "refusing to train on rollouts from weights it cannot name")
        staleness = module.global_step - produced.version
        if staleness > self.max_staleness or staleness < 0:
            raise PipelineError(f"rollout pipeline: the rollouts for step {module.global_step + 1} are {staleness} "
                                f"optimizer steps old (policy version {produced.version}), outside [0, "
                                f"{self.max_staleness}] (--model.pipeline.max_staleness)")
        waited = time.perf_counter() - start
        self.waited += waited
        return Taken(produced, staleness, waited)

    def after_step(self, module) -> None:
        """Publish this step's weights (when the optimizer stepped) and submit the next job with them."""
        if not self.started:
            return
        if module.global_step != self.version:
            self.version = module.global_step
            self.producer.publish(self.version, module.student)
        self.submit_next()

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """The rollouts in flight of every rank (each rank's own; gathered, as only rank 0 writes the checkpoint),
        finished first (each job's version was published before it was submitted, so each finishes), on the CPU; a
        resumed run trains them before anything new."""
        from opdlab.distributed import world_size

        mine = self.own_state()
        if world_size() == 1:
            return mine
        gathered = [None] * world_size()
        torch.distributed.all_gather_object(gathered, mine)
        return {"ranks": gathered, "max_staleness": self.max_staleness}

    def own_state(self) -> dict:
        jobs = []
        for job in self.jobs:
            if job.index not in self.ready:
                self.ready[job.index] = self.producer.result(job.index, self.options.timeout)
            produced = self.ready[job.index]
            jobs.append({"step": job.step, "version": produced.version, "batch": job.batch,
                         "rollout": rollout_state(produced.rollout)})
        return {"jobs": jobs, "max_staleness": self.max_staleness}

    def load_state_dict(self, state: dict) -> None:
        self.restored = state  # this rank's part is taken in `begin` (the trainer's rank is known there)

    def this_ranks(self, state, module) -> list[dict]:
        """This rank's rollouts in flight from a loaded state ([] when none was loaded)."""
        if not state:
            return []
        if "ranks" not in state:
            ranks = 1
            mine = state.get("jobs", [])
        else:
            ranks = len(state["ranks"])
            mine = state["ranks"][module.global_rank]["jobs"] if module.global_rank < ranks else None
        if ranks != module.trainer.world_size:
            raise PipelineError(f"the checkpoint holds the rollouts in flight of {ranks} rank(s) and this run has "
                                f"{module.trainer.world_size}: resume an asynchronous run on as many ranks as saved it")
        return list(mine)

    def restore(self, saved: dict) -> None:
        index = self.next_index
        job = Job(index=index, step=int(saved["step"]), version=int(saved["version"]), batch=saved["batch"],
                  prompts=None, params=None, generator_seed=0)
        rollout = rollout_from_state(saved["rollout"])
        self.jobs.append(job)
        self.ready[index] = self.finish(Produced(job, rollout, job.version, time.perf_counter(), 0.0, "restored"))
        self.next_index += 1

    def close(self) -> None:
        """Stop the producer and forget the schedule (a later fit of the same module starts afresh)."""
        self.producer.close()
        self.jobs.clear()
        self.ready.clear()
        self.started, self.next_index, self.batches = False, 0, None


def state_staleness(saved: list[dict], step: int) -> int:
    """The largest staleness the saved rollouts in flight will have when trained (from global step `step`)."""
    return max(step + i - int(job["version"]) for i, job in enumerate(saved))


def check_same_batch(batch: dict, expected: dict, step: int) -> None:
    """The data module's batch must be the one read ahead (by content: its prompts and stream indices)."""
    if batch.get("prompts") != expected.get("prompts") or batch.get("indices") != expected.get("indices"):
        got, want = (b.get("indices", [None])[:1] for b in (batch, expected))
        raise PipelineError(f"rollout pipeline: step {step}'s batch (first stream index {got[0]}) is not the batch the "
                            f"pipeline read ahead for it (first index {want[0]}): with max_staleness >= 1 the data "
                            "module's read_ahead() must yield the same batches as its train_dataloader()")


def rollout_state(rollout: Rollout) -> dict:
    """A rollout as plain tensors and lists on the CPU (what a checkpoint holds)."""
    return {"input_ids": rollout.input_ids.cpu(), "attention_mask": rollout.attention_mask.cpu(),
            "response_mask": rollout.response_mask.cpu(), "sampling_logp": rollout.sampling_logp.cpu(),
            "prompt_len": int(rollout.prompt_len), "answers": list(rollout.answers)}


def rollout_from_state(state: dict) -> Rollout:
    tensors = {k: torch.as_tensor(state[k]) for k in ("input_ids", "attention_mask", "response_mask", "sampling_logp")}
    return Rollout(**tensors, prompt_len=int(state["prompt_len"]), answers=list(state["answers"]))
