"""The LightningModule: a trainable student, a frozen teacher, one OPD step per batch, read as docs/method.md §1:
prompts --rollout--> Rollout --score--> TokenStats --select--> keep mask --loss--> scalar. The step's plan and paths:
`opdlab.step`; building: `building`; sampling: `sampling`; export: `export`; checkpoints: `student_checkpoint`;
warnings: `run_warnings`; the teacher's calls: `teachers.session`."""

from __future__ import annotations

import copy

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from opdlab import building, step, student_checkpoint
from opdlab.adapters import AdapterOptions, check_not_adapter_folder
from opdlab.callbacks.teacher import PipelineLifetime, TeacherLifetime
from opdlab.distributed import world_size
from opdlab.divergences import Divergence, SampledTokenOPD
from opdlab.engines import RolloutEngine, SamplingParams, StaticCacheEngine
from opdlab.evaluation.greedy import HeldOutAccuracy
from opdlab.export import export_student
from opdlab.heads import LogitHead
from opdlab.models import load_tokenizer
from opdlab.options import MemoryOptions, RolloutOptions, TrainingOptions, as_options
from opdlab.pipeline import PipelineOptions, Produced, RolloutPipeline, Taken, make_producer
from opdlab.plugins import alternatives, default_placement
from opdlab.rollout import PromptBatch, Rollout, derive_seed
from opdlab.run_warnings import NonFiniteGuard, RunWarnings, stage_name
from opdlab.sampling import StudentSampler, student_hidden_states
from opdlab.scoring import TokenStats
from opdlab.selectors import FullSelector, TokenSelector
from opdlab.step import Hidden, StepPlan, StepRecord, default_optimizer
from opdlab.teachers import TeacherLoadOptions, TeacherPlacement, check_teacher_needs
from opdlab.teachers.session import TeacherSession
from opdlab.timing import StageTimer


class OPDModule(L.LightningModule):
    """On-policy distillation of `student` from a frozen `teacher`, with a token selector.

    Args:
        student: student checkpoint: local directory, hub id, or `toy:<name>/student`.
        teacher: teacher checkpoint, same forms, or the URL of a server that serves it (`http://host:port/v1`).
            Its tokenizer must equal the student's.
        selector: which response positions get the loss, and its budget rule (default: all of them,
            full-token OPD).
        divergence: the per-token loss at kept positions (default: the paper's sampled-token OPD).
        optimizer: optimizer factory, applied to the student's parameters only.
        scheduler: optional learning-rate scheduler factory (stepped every optimizer step).
        teacher_placement: where the teacher runs: `local` (a model in this process, exact), `vllm_server` (a vLLM
            server), or a plugin's (`opdlab.teacher_placements`). Default: the one that accepts `teacher` (a URL:
            vllm_server; a path, hub id or `toy:` name: local). Options: `--model.teacher_placement.help vllm_server`.
        rollout_engine: what generates the student's responses: `static` (default: static KV cache, a CUDA graph
            on GPUs), `vllm` (colocated vLLM, weight-synced every step; `pip install -e ".[vllm]"`), `reference` (the
            plain loop), or a plugin's (`opdlab.rollout_engines`). Options: `--model.rollout_engine.help vllm`.
        rollout: sampling of the training responses (`--model.rollout.max_new_tokens` ...).
        memory: chunking, micro-batches, checkpointing, dtypes and sharding (`--model.memory.chunk_size` ...).
        training: loss normalisation, gradient clipping, non-finite-step limit and seed
            (`--model.training.seed` ...).
        student_adapter: train a LoRA adapter on the frozen student instead of all its weights
            (`--model.student_adapter.rank 32` ...; `pip install -e ".[peft]"`). See `opdlab.adapters`.
        pipeline: asynchronous rollouts with bounded staleness (`--model.pipeline.max_staleness 1`, its producer:
            a worker process, this process or a vLLM server fleet). Default 0: the synchronous loop.
    """

    def __init__(
        self,
        student: str = "toy:add3/student",
        teacher: str = "toy:add3/teacher",
        selector: TokenSelector | None = None,
        divergence: Divergence | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        teacher_placement: TeacherPlacement | None = None,
        rollout_engine: RolloutEngine | None = None,
        rollout: RolloutOptions = RolloutOptions(),  # noqa: B008 (jsonargparse reads the default; copied below)
        memory: MemoryOptions = MemoryOptions(),  # noqa: B008
        training: TrainingOptions = TrainingOptions(),  # noqa: B008
        student_adapter: AdapterOptions = AdapterOptions(),  # noqa: B008
        pipeline: PipelineOptions = PipelineOptions(),  # noqa: B008
    ) -> None:
        super().__init__()
        self.student_path, self.teacher_path = student, teacher
        self.rollout_options = as_options(RolloutOptions, rollout)
        self.memory_options = as_options(MemoryOptions, memory)
        self.training_options = as_options(TrainingOptions, training)  # (`self.training` is torch's train-mode flag)
        self.adapter_options = as_options(AdapterOptions, student_adapter)
        self.pipeline_options = as_options(PipelineOptions, pipeline)
        self.save_hyperparameters({"student": student, "teacher": teacher, "rollout": vars(self.rollout_options),
                                   "memory": vars(self.memory_options), "training": vars(self.training_options),
                                   "student_adapter": vars(self.adapter_options),
                                   "pipeline": vars(self.pipeline_options)})
        self.selector = selector if selector is not None else FullSelector()
        self.divergence = divergence if divergence is not None else SampledTokenOPD()
        self.placement = teacher_placement if teacher_placement is not None else default_placement(teacher)
        self.placement.check_spec(teacher)  # before anything loads; what it serves is checked after it connects
        self.teacher_session = TeacherSession(self.placement, self.stage_name)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.rollout_engine = rollout_engine if rollout_engine is not None else StaticCacheEngine()
        building.check_engine_takes_adapter(self.rollout_engine, self.adapter_options)
        # The rollouts of later steps, generated while this step trains (None: the synchronous loop).
        self.pipeline = None if self.pipeline_options.synchronous else RolloutPipeline(
            self.pipeline_options, make_producer(self.pipeline_options))
        self.producer_engine_template = copy.deepcopy(self.rollout_engine)  # unbound: a producer process's engine
        self.student = self.teacher = self.tokenizer = None
        self.accuracy = HeldOutAccuracy()
        self.strict_loading = False  # checkpoints leave out the frozen teacher (see on_save_checkpoint)
        self.full_entropy_requested = False  # see request_full_entropy
        self.warnings = RunWarnings()
        self.sampler = StudentSampler(self.rollout_engine, self.rollout_options, self.training_options.seed,
                                      self.warnings, self.stage_name)
        self.guard = NonFiniteGuard(self.training_options.max_bad_steps)
        self.automatic_optimization = False  # global selection spans micro-batches: see training_step

    # ----------------------------------------------------------------------------- models
    def configure_model(self) -> None:
        """Load tokenizers (and check them) before any weights, then the student and the frozen teacher."""
        if self.student is not None:
            return
        self.connect_teacher()
        mem, mesh = self.memory_options, building.data_parallel_mesh(self.device_mesh if self._trainer else None)
        self.student = building.build_student(self.student_path, mem, self.adapter_options, self.training_options.seed)
        # A local teacher: a frozen (sharded) model held here, so it moves with the module; None for a server.
        self.teacher = self.placement.load(self.student, self.tokenizer, TeacherLoadOptions(mem.teacher_dtype, mesh))
        building.shard_student(self.student, mesh, mem)
        building.check_positions(self.student, self.rollout_options, self.student_path)
        self.student_head = LogitHead(self.student, self.placement.columns)
        self.bind_rollout_engine()
        building.choose_cpu_threads([self.student, self.teacher], self.device)

    def connect_teacher(self) -> None:
        """Tokenizer, then the placement's checks; what it serves decides the needs check (before any weights)."""
        check_not_adapter_folder(self.student_path, "--model.student")  # before transformers half-loads one
        self.tokenizer = load_tokenizer(self.student_path)
        self.placement.connect(self.teacher_path, self.tokenizer,
                               building.max_sequence_len(self.student_path, self.rollout_options))
        check_teacher_needs(self.placement.signal, self.placement.name, suggest=alternatives, selector=self.selector,
                            divergence=self.divergence)
        building.check_top_k(self.selector.top_k, self.tokenizer, self.student_path)

    def bind_rollout_engine(self) -> None:
        """Attach the rollout engine to the current student object (again after it is replaced)."""
        self.sampler.bind(self.student, self.tokenizer, self.student_path)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher is a frozen function, never in train mode
        return self

    # ----------------------------------------------------------------------------- the OPD step
    def training_step(self, batch: dict, batch_idx: int) -> dict:
        """rollout -> score -> select -> loss, then one optimizer step (manual optimisation)."""
        timer, taken = StageTimer(self.device), None
        if self.pipeline is None:
            with timer("rollout"):
                rollout = self.rollout(self.encode(batch), seeds=self.sampler.prompt_seeds(batch))
        else:
            with timer("rollout_wait"):  # the producer generated it while earlier steps trained
                taken = self.pipeline.take(batch, self)
            rollout = taken.produced.rollout
        plan = self.plan(rollout.response_mask.shape[0])
        scoring = plan.scoring(self.selector.top_k)
        with timer("forward"):
            hidden = self.hidden_states(rollout, plan, pending=taken.produced.pending if taken else None)
        with timer("score"):
            shared = step.score_with_loss(hidden, rollout, plan, self.student_head, self.divergence, scoring) \
                if plan.shared_projection else None
            stats = shared[0] if shared else step.score(hidden, rollout, plan, self.student_head, scoring)
        with timer("select"):
            keep = stats.valid.clone() if shared else self.select(stats)
        record = StepRecord(rollout, stats, keep, timer.seconds, plan, timer.spans, taken)
        self.warnings.nothing_kept(keep, type(self.selector).__name__, self.global_step + 1)
        bad = stats.non_finite_models()
        paths = {"student": self.student_path, "teacher": self.teacher_path}
        if self.skip_non_finite(not bad, f"{' and '.join(bad)} log-probs ({', '.join(f'{m} {paths[m]}' for m in bad)})"):
            self.log_step(stepped=False)
            self.after_step(timer)
            return {"record": record}
        with timer("loss"):
            loss = step.backward_shared(shared[1], self.manual_backward) if shared else step.backward_kept(
                hidden, keep, rollout, stats, plan, self.student_head, self.divergence, self.student_hidden_states,
                self.manual_backward)
        with timer("optimizer"):
            stepped = self.optimizer_step()
        self.after_step(timer)
        self.log_step(stepped, loss, timer.seconds, rows=rollout.response_mask.shape[0], taken=taken)
        return {"loss": loss, "record": record} if stepped else {"record": record}

    def select(self, stats: TokenStats) -> torch.Tensor:
        """Keep mask for this rank's rows (`opdlab.step.select`; one generator on every rank)."""
        return step.select(self.selector, stats, self.step_generator(salt=1, device="cpu", per_rank=False))

    def after_step(self, timer: StageTimer) -> None:
        """Hand the producer this step's weights and the next job (an inline producer generates it now)."""
        if self.pipeline is not None:
            with timer("publish"):
                self.pipeline.after_step(self)

    def finish_rollout(self, produced: Produced) -> Produced:
        """A producer's rollout as it arrives: on the student's device, and sent to a served teacher at once."""
        produced.rollout = produced.rollout.to(self.device)
        produced.pending = self.teacher_session.request(produced.rollout)
        return produced

    def sampling_params(self, batch: dict) -> SamplingParams:
        """`batch`'s training rollouts' sampling settings (`rollout` options, the prompts' seeds; no generator)."""
        opts = self.rollout_options
        return SamplingParams(num_samples=opts.num_samples, max_new_tokens=opts.max_new_tokens,
                              temperature=opts.temperature, top_p=opts.top_p, seeds=self.sampler.prompt_seeds(batch),
                              sync_ranks=world_size() > 1)

    def generator_seed(self, step: int, salt: int = 0) -> int:
        """The seed of `step_generator` at global step `step` on this rank."""
        return derive_seed(self.training_options.seed, step, self.global_rank if self._trainer is not None else 0, salt)

    def log_step(self, stepped: bool, loss: torch.Tensor | None = None, seconds: dict | None = None, rows: int = 1,
                 taken: Taken | None = None) -> None:
        """The x-axis of this step's points is its number from 1 (Lightning's counter is one behind in training), so
        step 50's loss and the validation after it both sit at 50; a skipped update does not advance global_step."""
        self.log("step", float(self.global_step + (0 if stepped else 1)), batch_size=1)
        self.log("train/skipped_steps", float(self.guard.skipped), batch_size=1)
        if loss is None:
            return
        self.log("train/loss", loss, prog_bar=True, batch_size=rows)
        self.log_dict({f"time/{k}": v for k, v in seconds.items()}, batch_size=1)
        if taken is not None:
            self.log_dict({"rollout/staleness": float(taken.staleness), "rollout/staleness_max": float(taken.staleness),
                           "rollout/wait_seconds": taken.waited, "rollout/policy_version": float(taken.produced.version)},
                          batch_size=1)
        metrics = self.placement.step_metrics()  # a served teacher's wire bytes, waits, retries
        if metrics:
            self.log_dict(metrics, batch_size=1)

    def plan(self, rows: int) -> StepPlan:
        """The plan of a step over `rows` rollout rows (`opdlab.step.plan_for`)."""
        return step.plan_for(rows, self.memory_options, self.training_options, self.selector, self.scores_full_entropy,
                             getattr(self, "student_head", None))

    def on_fit_start(self) -> None:
        """Print the step plan of a full batch and the teacher's placement once, before training starts."""
        batch_size = getattr(self.trainer.datamodule, "batch_size", None) if self.trainer.datamodule else None
        self.warnings.announce(self.plan(batch_size * self.rollout_options.num_samples) if batch_size else None,
                               self.placement, self.student, self.selector.top_k)

    def on_train_start(self) -> None:
        """An asynchronous run starts its producer and submits the first N + 1 steps' rollouts (after a resume has
        restored the data position and the rollouts in flight)."""
        if self.pipeline is not None:
            self.pipeline.begin(self, self.finish_rollout)

    def encode(self, batch: dict) -> PromptBatch:
        return self.sampler.encode(batch, self.chat_template)

    def rollout(self, prompts: PromptBatch, greedy: bool = False, seeds: list[int] | None = None) -> Rollout:
        return self.sampler.rollout(prompts, self.step_generator(), greedy, seeds)

    def generate(self, prompts: PromptBatch, params: SamplingParams) -> Rollout:
        return self.sampler.generate(prompts, params)

    def stage_name(self) -> str:
        return stage_name(self.trainer if self._trainer is not None else None, self.global_step)

    def hidden_states(self, rollout: Rollout, plan: StepPlan, student_grad: bool | None = None,
                      pending: object | None = None) -> Hidden:
        """Each micro-batch's student hidden states (with their graph when the loss reuses them) and teacher rows on the
        student's device; a served teacher's requests go out first (or went out when a producer's rollout arrived,
        `pending`) and run while the student's forward does."""
        grad = plan.reuse_student_graph if student_grad is None else student_grad
        pending = pending if pending is not None else self.teacher_session.request(rollout)
        device = self.student_head.proj.weight.device
        return [(self.student_hidden_states(rollout.rows(rows), grad), self.teacher_session.rows(pending, rows, device))
                for rows in plan.micro_batches]

    def student_hidden_states(self, rollout: Rollout, student_grad: bool = True) -> torch.Tensor:
        return student_hidden_states(self.student, rollout, student_grad)

    def request_full_entropy(self) -> None:
        """Ask every step for the full-vocabulary entropies (two more passes per chunk; callbacks call this in setup)."""
        self.full_entropy_requested = True

    @property
    def scores_full_entropy(self) -> bool:
        return self.full_entropy_requested or getattr(self.selector, "needs_full_entropy", False)

    def optimizer_step(self) -> bool:
        """Clip, check the gradient norm, step (`opdlab.step.optimizer_step`); a non-finite norm skips the update."""
        norm = step.optimizer_step(self.optimizers(), self.lr_schedulers(), self.student.parameters(),
                                   self.training_options.gradient_clip_val, self.skip_non_finite)
        if norm is not None:
            self.sampler.stale = True
            self.log("train/grad_norm", norm.float(), batch_size=1)
        return norm is not None

    def skip_non_finite(self, finite: bool, what: str) -> bool:
        """Agree across ranks whether this step is finite; count, warn, and stop after too many in a row."""
        return self.guard.skip(finite, what, self.global_step, self.stage_name(), self.device)

    # ----------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Greedy held-out accuracy; the teacher's once per run, with its own placement's greedy answers."""
        prompts = self.encode(batch)
        student = self.rollout(prompts, greedy=True)
        teacher = None if self.accuracy.teacher_done else self.teacher_session.generate(
            prompts, self.rollout_options.max_new_tokens, world_size() > 1)
        self.accuracy.update(self.tokenizer, self.trainer.datamodule.verify, prompts, student, teacher)

    def on_validation_epoch_end(self) -> None:
        self.log("step", float(self.global_step))  # the validation after step N is logged at N (see log_step)
        student, teacher = self.accuracy.compute(count_teacher=not self.trainer.sanity_checking)
        self.log("val/accuracy", student, prog_bar=True)
        if teacher is not None:
            self.log("val/teacher_accuracy", teacher)
            self.warnings.teacher_never_right(float(teacher), self.teacher_path)

    test_step = validation_step

    def on_test_epoch_end(self) -> None:
        self.log("test/accuracy", self.accuracy.compute(count_teacher=False)[0])

    @property
    def chat_template(self) -> bool:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return bool(getattr(getattr(dm, "source", None), "use_chat_template", False))

    def step_generator(self, salt: int = 0, device: torch.device | str | None = None, per_rank: bool = True) -> torch.Generator:
        """A generator seeded by (seed, global step, rank, salt): reproducible and resumable."""
        rank, number = (self.global_rank if per_rank else 0, self.global_step) if self._trainer is not None else (0, 0)
        return torch.Generator(device=device or self.device).manual_seed(derive_seed(self.training_options.seed, number, rank, salt))

    def configure_optimizers(self):
        return step.configure_optimizers(self.optimizer_factory, self.scheduler_factory, self.student.parameters())

    def configure_callbacks(self) -> list:
        return [TeacherLifetime(), PipelineLifetime()]  # close the teacher placement and the rollout producer at the
        # end, on failure and on Ctrl-C

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        student_checkpoint.on_save(checkpoint, self.student, self.state_dict(), self.guard)
        if self.pipeline is not None and self.pipeline.started:  # the rollouts in flight (exact resume)
            checkpoint["rollout_pipeline"] = self.pipeline.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.sampler.stale = True  # the restored weights replace the student's after this hook
        student_checkpoint.on_load(checkpoint, self.student, self.state_dict(), self.guard)
        if "rollout_pipeline" in checkpoint:
            if self.pipeline is not None:
                self.pipeline.load_state_dict(checkpoint["rollout_pipeline"])
            else:
                self.warnings.once("pipeline_resume", "opdlab: this checkpoint holds rollouts sampled ahead by an "
                                   "asynchronous run; this run is synchronous (--model.pipeline.max_staleness 0) and "
                                   "samples its own instead")

    def export_student(self, path: str) -> None:
        """Save the student as a plain HF checkpoint (with its tokenizer), or its adapter. Call on every rank."""
        export_student(self.student, self.tokenizer, path, self.student_path, self.adapter_options, self.device)


# Moved after 0.2.0; the old paths warn and work for one release.
from opdlab._deprecation import moved_names

__getattr__ = moved_names(__name__, {
    "choose_cpu_threads": "opdlab.building:choose_cpu_threads", "SMALL_MODEL_PARAMETERS": "opdlab.building:SMALL_MODEL_PARAMETERS",
    "non_finite_parameters": "opdlab.export:non_finite_parameters", "readable_by_default": "opdlab.export:readable_by_default",
    "NonFiniteTraining": "opdlab.run_warnings:NonFiniteTraining"})
