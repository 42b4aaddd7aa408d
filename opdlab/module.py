"""The LightningModule: a trainable student and a frozen teacher, one OPD step per batch. `training_step` reads as
docs/method.md §1: prompts --rollout--> Rollout --score--> TokenStats --select--> keep mask --loss--> scalar.

How a step runs is decided once by `opdlab.step.plan_step`, and its paths are the functions of `opdlab.step`.
Building the models: `opdlab.building`; export: `opdlab.export`; checkpoints: `opdlab.student_checkpoint`; the
run's warnings: `opdlab.run_warnings`; the teacher's calls: `opdlab.teachers.session`.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from opdlab import building, step, student_checkpoint
from opdlab.adapters import AdapterOptions, check_not_adapter_folder, describe, is_adapted
from opdlab.callbacks.teacher import TeacherLifetime
from opdlab.checkpointing import restore_rng_state
from opdlab.distributed import world_size
from opdlab.divergences import Divergence, SampledTokenOPD
from opdlab.engines import RolloutEngine, SamplingParams, StaticCacheEngine
from opdlab.evaluation import verified
from opdlab.export import export_student
from opdlab.heads import LogitHead
from opdlab.models import final_hidden_states, load_tokenizer
from opdlab.options import MemoryOptions, RolloutOptions, TrainingOptions, as_options
from opdlab.plugins import alternatives, default_placement
from opdlab.rollout import PromptBatch, Rollout, derive_seed, encode_prompts, response_positions
from opdlab.run_warnings import NonFiniteGuard, NonFiniteTraining, RunWarnings, stage_name  # noqa: F401 (re-export)
from opdlab.scoring import TokenStats
from opdlab.selectors import FullSelector, TokenSelector
from opdlab.step import Hidden, StepPlan, StepRecord, plan_step
from opdlab.teachers import TeacherLoadOptions, TeacherPlacement, check_teacher_needs
from opdlab.teachers.session import TeacherSession
from opdlab.timing import StageTimer


def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


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
        teacher_placement: where the teacher runs: `local` (a model in this process, exact; the default for a
            path, hub id or `toy:` name), `vllm_server` (a vLLM server; the default when `teacher` is an http(s)
            URL, or several separated by commas), or a plugin's (entry-point group `opdlab.teacher_placements`).
            Its options: `opdlab fit --model.teacher_placement.help vllm_server`. See docs/method.md §2.6.
        rollout_engine: what generates the student's responses (training rollouts, greedy validation, the
            diagnostic's bank): `static` (default: static KV cache, decode step compiled into a CUDA graph on
            GPUs), `vllm` (a colocated vLLM instance, weight-synced every step; `pip install -e ".[vllm]"`),
            `reference` (the plain eager loop the others are tested against), or a plugin's engine
            (entry-point group `opdlab.rollout_engines`). Each engine's options:
            `opdlab fit --model.rollout_engine.help vllm`. See `opdlab.engines`.
        rollout: sampling of the training responses (`--model.rollout.max_new_tokens` ...).
        memory: chunking, micro-batches, checkpointing, dtypes and sharding (`--model.memory.chunk_size` ...).
        training: loss normalisation, gradient clipping, non-finite-step limit and seed
            (`--model.training.seed` ...).
        student_adapter: train a LoRA adapter on the frozen student instead of all its weights
            (`--model.student_adapter.rank 32` ...; `pip install -e ".[peft]"`). See `opdlab.adapters`.
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
    ) -> None:
        super().__init__()
        self.student_path, self.teacher_path = student, teacher
        self.rollout_options = as_options(RolloutOptions, rollout)
        self.memory_options = as_options(MemoryOptions, memory)
        self.training_options = as_options(TrainingOptions, training)  # (`self.training` is torch's train-mode flag)
        self.adapter_options = as_options(AdapterOptions, student_adapter)
        self.save_hyperparameters({"student": student, "teacher": teacher, "rollout": vars(self.rollout_options),
                                   "memory": vars(self.memory_options), "training": vars(self.training_options),
                                   "student_adapter": vars(self.adapter_options)})
        self.selector = selector if selector is not None else FullSelector()
        self.divergence = divergence if divergence is not None else SampledTokenOPD()
        self.placement = teacher_placement if teacher_placement is not None else default_placement(teacher)
        self.placement.check_spec(teacher)  # before anything loads; what it serves is checked after it connects
        self.teacher_session = TeacherSession(self.placement, self.stage_name)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.rollout_engine = rollout_engine if rollout_engine is not None else StaticCacheEngine()
        building.check_engine_takes_adapter(self.rollout_engine, self.adapter_options)
        self.engine_weights_stale = True  # the engine takes the student's weights before its next rollout
        self.student = self.teacher = self.tokenizer = None
        self.val_accuracy, self.teacher_accuracy = MeanMetric(), MeanMetric()
        self.teacher_evaluated = False
        self.strict_loading = False  # checkpoints leave out the frozen teacher (see on_save_checkpoint)
        self.full_entropy_requested = False  # see request_full_entropy
        self.warnings = RunWarnings()
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
        # A local teacher comes back as a frozen (sharded) model, held here so it moves with the module; None for a server.
        self.teacher = self.placement.load(self.student, self.tokenizer, TeacherLoadOptions(mem.teacher_dtype, mesh))
        building.shard_student(self.student, mesh, mem)
        building.check_positions(self.student, self.rollout_options, self.student_path)
        self.student_head = LogitHead(self.student, self.placement.columns)
        self.bind_rollout_engine()
        building.choose_cpu_threads([self.student, self.teacher], self.device)

    def connect_teacher(self) -> None:
        """The student's tokenizer, then the teacher placement's identity checks; what the placement then serves
        decides whether the selector and divergence can be served (before any weights load)."""
        check_not_adapter_folder(self.student_path, "--model.student")  # before transformers half-loads one
        self.tokenizer = load_tokenizer(self.student_path)
        self.placement.connect(self.teacher_path, self.tokenizer,
                               building.max_sequence_len(self.student_path, self.rollout_options))
        check_teacher_needs(self.placement.signal, self.placement.name, suggest=alternatives, selector=self.selector,
                            divergence=self.divergence)
        if self.selector.top_k > len(self.tokenizer):
            raise ValueError(f"selector top_k={self.selector.top_k} exceeds the vocabulary ({len(self.tokenizer)} "
                             f"tokens of {self.student_path}); use top_k <= {len(self.tokenizer)}")

    def bind_rollout_engine(self) -> None:
        """Attach the rollout engine to the current student object (again after it is replaced)."""
        self.rollout_engine.bind(self.student, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
        self.engine_weights_stale = True

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher is a frozen function, never in train mode
        return self

    # ----------------------------------------------------------------------------- the OPD step
    def training_step(self, batch: dict, batch_idx: int) -> dict:
        """rollout -> score -> select -> loss, then one optimizer step (manual optimisation)."""
        timer = StageTimer(self.device)
        with timer("rollout"):
            rollout = self.rollout(self.encode(batch), seeds=self.prompt_seeds(batch))
        plan = self.plan(rollout.response_mask.shape[0])
        scoring = plan.scoring(self.selector.top_k)
        with timer("forward"):
            hidden = self.hidden_states(rollout, plan)
        with timer("score"):
            shared = step.score_with_loss(hidden, rollout, plan, self.student_head, self.divergence, scoring) \
                if plan.shared_projection else None
            stats = shared[0] if shared else step.score(hidden, rollout, plan, self.student_head, scoring)
        with timer("select"):
            keep = stats.valid.clone() if shared else self.select(stats)
        record = StepRecord(rollout, stats, keep, timer.seconds, plan)
        self.warnings.nothing_kept(keep, type(self.selector).__name__, self.global_step + 1)
        bad = stats.non_finite_models()
        if self.skip_non_finite(not bad, f"{' and '.join(bad)} log-probs ({self.checkpoints_of(bad)})"):
            self.log_step_number(stepped=False)
            return {"record": record}
        with timer("loss"):
            loss = self.backward_shared(shared[1]) if shared else step.backward_kept(
                hidden, keep, rollout, stats, plan, self.student_head, self.divergence, self.student_hidden_states,
                self.manual_backward)
        with timer("optimizer"):
            stepped = self.optimizer_step()
        self.log_step_number(stepped)
        self.log_step(loss, timer.seconds, rows=rollout.response_mask.shape[0])
        return {"loss": loss, "record": record} if stepped else {"record": record}

    def backward_shared(self, loss) -> torch.Tensor:
        self.manual_backward(loss.loss)
        return step.global_loss(loss.loss)

    def select(self, stats: TokenStats) -> torch.Tensor:
        """Keep mask for this rank's rows (`opdlab.step.select`; one generator on every rank)."""
        return step.select(self.selector, stats, self.step_generator(salt=1, device="cpu", per_rank=False))

    def log_step_number(self, stepped: bool) -> None:
        """The x-axis of this step's logged points: its number, counted from 1 (Lightning's own counter is one
        behind during training), so step 50's loss and the validation after it both sit at 50, as the console
        says. A skipped update does not advance global_step, hence + 1 then."""
        self.log("step", float(self.global_step + (0 if stepped else 1)), batch_size=1)
        self.log("train/skipped_steps", float(self.guard.skipped), batch_size=1)

    def log_step(self, loss: torch.Tensor, seconds: dict[str, float], rows: int) -> None:
        self.log("train/loss", loss, prog_bar=True, batch_size=rows)
        self.log_dict({f"time/{k}": v for k, v in seconds.items()}, batch_size=1)
        metrics = self.placement.step_metrics()  # a served teacher's wire bytes, waits, retries
        if metrics:
            self.log_dict(metrics, batch_size=1)

    def plan(self, rows: int) -> StepPlan:
        """The plan of a step over `rows` rollout rows (`opdlab.step.plan_step`)."""
        head = getattr(self, "student_head", None)  # a sharded (FSDP2) head takes head_loss's autograd path
        return plan_step(
            rows, micro_batch_size=self.memory_options.micro_batch_size, chunk_size=self.memory_options.chunk_size,
            keeps_every_valid_position=self.selector.keeps_every_valid_position,
            full_kl=self.selector.needs_full_kl, full_entropy=self.scores_full_entropy,
            loss_denominator=self.training_options.loss_normalization,
            shared_projection=head is None or head.is_plain_linear,
            topk_lists=getattr(self.selector, "needs_topk_lists", False),
        )

    def on_fit_start(self) -> None:
        """Print the step plan of a full batch and the teacher's placement once, before training starts."""
        batch_size = getattr(self.trainer.datamodule, "batch_size", None) if self.trainer.datamodule else None
        if batch_size:
            rank_zero_info(f"opdlab: {self.plan(batch_size * self.rollout_options.num_samples).describe()}")
        rank_zero_info(f"opdlab: {self.placement.describe()}")
        if is_adapted(self.student):
            rank_zero_info(f"opdlab: {describe(self.student)}")
        self.warnings.top_k_above_sent(self.selector.top_k, self.placement.signal.top_logprobs)

    def encode(self, batch: dict) -> PromptBatch:
        opts = self.rollout_options
        prompts = encode_prompts(self.tokenizer, batch["prompts"], batch["answers"], opts.max_prompt_len,
                                 opts.on_long_prompt, chat_template=self.chat_template)
        if not self.chat_template:
            self.warnings.unknown_tokens(self.tokenizer, prompts, batch["prompts"], opts.max_prompt_len, self.student_path)
        self.warnings.past_positions(prompts, building.position_limit(self.student), opts.max_new_tokens, self.student_path)
        return prompts

    def prompt_seeds(self, batch: dict) -> list[int] | None:
        """One sampling seed per prompt, from its stream index: samples do not depend on batch splits."""
        return [derive_seed(self.training_options.seed, int(i)) for i in batch["indices"]] if "indices" in batch else None

    def rollout(self, prompts: PromptBatch, greedy: bool = False, seeds: list[int] | None = None) -> Rollout:
        """The student's responses with this run's sampling settings (greedy: one each, temperature 0)."""
        opts = self.rollout_options
        return self.generate(prompts, SamplingParams(
            num_samples=1 if greedy else opts.num_samples, max_new_tokens=opts.max_new_tokens,
            temperature=0.0 if greedy else opts.temperature, top_p=opts.top_p, seeds=None if greedy else seeds,
            generator=self.step_generator(), sync_ranks=world_size() > 1,
        ))

    def generate(self, prompts: PromptBatch, params: SamplingParams) -> Rollout:
        """Student rollouts from the engine, which first takes the weights of the last optimizer step."""
        try:
            if self.engine_weights_stale:
                self.rollout_engine.load_weights(self.student)
                self.engine_weights_stale = False
            return self.rollout_engine.generate(prompts, params)
        except Exception as err:  # noqa: BLE001 - any engine failure (an external engine raises its own types)
            raise RuntimeError(f"rollout engine {type(self.rollout_engine).__name__} failed {self.stage_name()}: "
                               f"{type(err).__name__}: {' '.join(str(err).split())[:600]}") from err

    def stage_name(self) -> str:
        return stage_name(self.trainer if self._trainer is not None else None, self.global_step)

    def hidden_states(self, rollout: Rollout, plan: StepPlan, student_grad: bool | None = None) -> Hidden:
        """The student's hidden states and the teacher's rows (on the student's device) of each micro-batch; the
        student's keep their graph when the loss reuses this forward (one micro-batch). A served teacher's requests
        go out first and run while the student's forward does."""
        grad = plan.reuse_student_graph if student_grad is None else student_grad
        pending, device = self.teacher_session.request(rollout), self.student_head.proj.weight.device
        return [(self.student_hidden_states(rollout.rows(rows), grad), self.teacher_session.rows(pending, rows, device))
                for rows in plan.micro_batches]

    def student_hidden_states(self, rollout: Rollout, student_grad: bool = True) -> torch.Tensor:
        """(N, L, H) student hidden states that predict each response token."""
        with torch.set_grad_enabled(student_grad):
            hidden = final_hidden_states(self.student, rollout.input_ids, rollout.attention_mask)
        return hidden[:, response_positions(rollout)]

    def request_full_entropy(self) -> None:
        """Ask the scoring pass for the full-vocabulary entropies (`TokenStats.student_entropy`,
        `teacher_entropy`) from now on; callbacks that read them call this in `setup`. They cost two
        extra passes over every chunk's logits, so no step computes them unless asked."""
        self.full_entropy_requested = True

    @property
    def scores_full_entropy(self) -> bool:
        return self.full_entropy_requested or getattr(self.selector, "needs_full_entropy", False)

    def checkpoints_of(self, models: list[str]) -> str:
        """The checkpoints behind the named models ('student', 'teacher'), for error messages."""
        paths = {"student": self.student_path, "teacher": self.teacher_path}
        return ", ".join(f"{m} {paths[m]}" for m in models)

    def optimizer_step(self) -> bool:
        """Clip, check the gradient norm, step (`opdlab.step.optimizer_step`); a non-finite norm skips the update."""
        norm = step.optimizer_step(self.optimizers(), self.lr_schedulers(), self.student.parameters(),
                                   self.training_options.gradient_clip_val, self.skip_non_finite)
        if norm is not None:
            self.engine_weights_stale = True
            self.log("train/grad_norm", norm.float(), batch_size=1)
        return norm is not None

    def skip_non_finite(self, finite: bool, what: str) -> bool:
        """Agree across ranks whether this step is finite; count, warn, and stop after too many in a row."""
        return self.guard.skip(finite, what, self.global_step, self.stage_name(), self.device)

    # ----------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        prompts = self.encode(batch)
        self.val_accuracy.update(self.correct(prompts, self.rollout(prompts, greedy=True)))
        if not self.teacher_evaluated:  # once per run, with the plain loop (the engine serves the student)
            teacher = self.teacher_session.generate(prompts, self.rollout_options.max_new_tokens, world_size() > 1)
            self.teacher_accuracy.update(self.correct(prompts, teacher))

    def correct(self, prompts: PromptBatch, rollout: Rollout) -> torch.Tensor:
        """1.0 per greedy response the data's verifier accepts, else 0.0."""
        return torch.tensor(verified(self.tokenizer, rollout, prompts.answers, self.trainer.datamodule.verify),
                            dtype=torch.float32)

    def on_validation_epoch_end(self) -> None:
        self.log("step", float(self.global_step))  # the validation after step N is logged at N (see log_step_number)
        self.log("val/accuracy", self.val_accuracy.compute(), prog_bar=True)
        self.val_accuracy.reset()
        if not self.teacher_evaluated and not self.trainer.sanity_checking:
            teacher = self.teacher_accuracy.compute()
            self.log("val/teacher_accuracy", teacher)
            self.teacher_evaluated = True
            self.warnings.teacher_never_right(float(teacher), self.teacher_path)

    test_step = validation_step

    def on_test_epoch_end(self) -> None:
        self.log("test/accuracy", self.val_accuracy.compute())
        self.val_accuracy.reset()

    # ----------------------------------------------------------------------------- plumbing
    @property
    def chat_template(self) -> bool:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return bool(getattr(getattr(dm, "source", None), "use_chat_template", False))

    def step_generator(self, salt: int = 0, device: torch.device | str | None = None, per_rank: bool = True) -> torch.Generator:
        """A generator seeded by (seed, global step, rank, salt): reproducible and resumable."""
        rank = self.global_rank if self._trainer is not None and per_rank else 0
        step_number = self.global_step if self._trainer is not None else 0
        gen = torch.Generator(device=device or self.device)
        gen.manual_seed(derive_seed(self.training_options.seed, step_number, rank, salt))
        return gen

    def configure_optimizers(self):
        return step.configure_optimizers(self.optimizer_factory, self.scheduler_factory, self.student.parameters())

    def configure_callbacks(self) -> list:
        return [TeacherLifetime()]  # closes the teacher placement at the end, on failure and on Ctrl-C

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        kept = student_checkpoint.saved_student_keys(self.student, self.state_dict())
        student_checkpoint.strip_to_student(checkpoint, kept, self.guard.skipped,
                                            student_checkpoint.adapter_signature(self.student))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.engine_weights_stale = True  # the restored weights replace the student's after this hook
        kept = student_checkpoint.saved_student_keys(self.student, self.state_dict())
        student_checkpoint.check_fits(checkpoint, kept, student_checkpoint.adapter_signature(self.student))
        if "opdlab" in checkpoint:
            restore_rng_state(checkpoint["opdlab"]["rng"])
            self.guard.skipped = checkpoint["opdlab"]["skipped_steps"]

    def export_student(self, path: str) -> None:
        """Save the student as a plain HF checkpoint (with its tokenizer), or its adapter. Call on every rank."""
        export_student(self.student, self.tokenizer, path, self.student_path, self.adapter_options, self.device)


# Moved after 0.2.0; the old paths warn and work for one release.
from opdlab._deprecation import moved_names  # noqa: E402

__getattr__ = moved_names(__name__, {"choose_cpu_threads": "opdlab.building:choose_cpu_threads",
                                     "non_finite_parameters": "opdlab.export:non_finite_parameters",
                                     "readable_by_default": "opdlab.export:readable_by_default",
                                     "SMALL_MODEL_PARAMETERS": "opdlab.building:SMALL_MODEL_PARAMETERS"})
