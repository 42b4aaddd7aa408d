"""The LightningModule: a trainable student and a frozen teacher, one OPD step per batch.

`training_step` reads as the data-flow diagram of docs/method.md §1:

    prompts --rollout--> Rollout --score--> TokenStats --select--> keep mask --loss--> scalar

The student runs one forward to its final hidden states; selection statistics come from the LM heads
applied chunk by chunk without grad; the head loss (`opdlab.loss.head_loss`) then applies the student
head with grad to the kept rows only. How a step runs (micro-batches, chunk sizes, whether scoring and
loss share a projection) is decided once per step by `opdlab.step.plan_step`.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torchmetrics import MeanMetric

from opdlab.adapters import AdapterOptions, adapter_config, apply_adapter, describe, is_adapted, save_adapter
from opdlab.checkpointing import capture_rng_state, restore_rng_state
from opdlab.console import OpdlabError
from opdlab.distributed import all_reduce_sum, gather_stats, world_size
from opdlab.divergences import Divergence, SampledTokenOPD
from opdlab.engines import RolloutEngine, SamplingParams, StaticCacheEngine
from opdlab.evaluation import verified
from opdlab.heads import LogitHead
from opdlab.loss import HeadLoss, Scoring, head_loss, kept_rows
from opdlab.models import check_tokenizers_compatible, final_hidden_states, load_causal_lm, load_tokenizer, resolve_model_path
from opdlab.options import MemoryOptions, RolloutOptions, TrainingOptions
from opdlab.rollout import PromptBatch, Rollout, derive_seed, encode_prompts, response_positions
from opdlab.scoring import TokenStats, compute_token_stats, scatter_rows
from opdlab.selectors import FullSelector, TokenSelector
from opdlab.sharding import is_sharded, shard_model
from opdlab.step import StepPlan, global_loss, loss_scale, plan_step
from opdlab.teachers import PendingTeacher, TeacherLoadOptions, TeacherPlacement, TeacherRows, default_placement
from opdlab.teachers.signal import check_teacher_needs
from opdlab.timing import StageTimer

Hidden = list[tuple[torch.Tensor, TeacherRows]]  # per micro-batch: the student's (n, L, H) hidden states, the teacher's rows


@dataclass
class StepRecord:
    """What one training step selected, handed to callbacks as `outputs["record"]` (no hidden states or
    logits are kept)."""

    rollout: Rollout
    stats: TokenStats
    keep: torch.Tensor  # (N, L) bool
    seconds: dict[str, float]
    plan: StepPlan


@dataclasses.dataclass
class LossPath:
    """How a training step gets from hidden states to the loss, chosen once by the step plan:

    - `shared` (a selector that keeps every valid position, one micro-batch, a local head): one projection per
      chunk gives the statistics and the loss of every row; nothing is selected;
    - otherwise: the statistics without grad, the selector's keep mask, then the loss on the kept rows only.
    """

    module: "OPDModule"
    hidden: list
    rollout: Rollout
    plan: StepPlan
    shared_loss: HeadLoss | None = None

    def score(self) -> TokenStats:
        if self.plan.shared_projection:
            stats, self.shared_loss = self.module.score_with_loss(self.hidden, self.rollout, self.plan)
            return stats
        return self.module.score(self.hidden, self.rollout, self.plan)

    def select(self, stats: TokenStats) -> torch.Tensor:
        return stats.valid.clone() if self.plan.shared_projection else self.module.select(stats)

    def backward(self, keep: torch.Tensor, stats: TokenStats) -> torch.Tensor:
        """Backpropagate the step's loss; returns its global value."""
        if self.shared_loss is not None:
            self.module.manual_backward(self.shared_loss.loss)
            return global_loss(self.shared_loss.loss)
        return self.module.backward_loss(self.hidden, keep, self.rollout, stats, self.plan)


def as_options(cls, value):
    """A private copy of an options group, from the group itself, a dict (a checkpoint's saved
    hyperparameters) or None (the defaults)."""
    return cls() if value is None else cls(**value) if isinstance(value, dict) else dataclasses.replace(value)


def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)



class NonFiniteTraining(OpdlabError, FloatingPointError):
    """Too many non-finite steps in a row: the fit stops (one line from the CLI); the checkpoints saved before stay."""

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
        self.placement.check_spec(teacher)  # before anything loads: a placement that cannot give what is needed too
        check_teacher_needs(self.placement.signal, self.placement.name, selector=self.selector, divergence=self.divergence)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.rollout_engine = rollout_engine if rollout_engine is not None else StaticCacheEngine()
        if self.adapter_options.enabled and not self.rollout_engine.loads_adapters:
            raise ValueError(f"student_adapter options need a rollout engine that generates with an adapted student; "
                             f"{type(self.rollout_engine).__name__} does not declare loads_adapters = True (see "
                             "opdlab.engines.RolloutEngine.loads_adapters): use --model.rollout_engine static, reference "
                             "or vllm, or drop the student_adapter options")
        self.engine_weights_stale = True  # the engine takes the student's weights before its next rollout
        self.student = self.teacher = self.tokenizer = None
        self.val_accuracy = MeanMetric()
        self.teacher_accuracy = MeanMetric()
        self.teacher_evaluated = False
        self.strict_loading = False  # checkpoints leave out the frozen teacher (see on_save_checkpoint)
        self.full_entropy_requested = False  # see request_full_entropy
        self.warned_unknown_tokens = False  # see warn_unknown_tokens
        self.warned_nothing_kept = self.warned_positions = False  # see warn_if_nothing_kept, warn_past_positions
        self.automatic_optimization = False  # global selection spans micro-batches: see training_step
        self.skipped_steps = self.bad_steps_in_a_row = 0

    # ----------------------------------------------------------------------------- models
    def configure_model(self) -> None:
        """Load tokenizers (and check them) before any weights, then the student and the frozen teacher."""
        if self.student is not None:
            return
        mem = self.memory_options
        self.tokenizer = load_tokenizer(self.student_path)
        self.placement.connect(self.teacher_path, self.tokenizer, self.max_sequence_len())
        if self.selector.top_k > len(self.tokenizer):  # checked before any weights load
            raise ValueError(f"selector top_k={self.selector.top_k} exceeds the vocabulary ({len(self.tokenizer)} "
                             f"tokens of {self.student_path}); use top_k <= {len(self.tokenizer)}")
        self.student = load_causal_lm(self.student_path, mem.student_dtype)
        if self.adapter_options.enabled:  # before sharding: the adapter's layers are sharded with their decoder layer
            with torch.random.fork_rng(devices=[]):  # a new adapter's init: from the run's seed, RNG streams untouched
                torch.manual_seed(self.training_options.seed)
                apply_adapter(self.student, self.adapter_options, self.student_path)
        self.student.train()  # from_pretrained returns eval mode: dropout and checkpointing need train
        if mem.gradient_checkpointing:
            self.student.gradient_checkpointing_enable()
            if is_adapted(self.student):  # frozen embeddings: checkpointed blocks need an input that requires grad
                self.student.enable_input_require_grads()
        mesh = self.device_mesh if self._trainer is not None else None
        dp_mesh = None
        if mesh is not None:  # ModelParallelStrategy: FSDP2 over its data-parallel mesh
            dp_mesh = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
        # A local teacher comes back as a frozen (sharded) model, held here so it moves with the module; None for a server.
        self.teacher = self.placement.load(self.student, self.tokenizer, TeacherLoadOptions(mem.teacher_dtype, dp_mesh))
        if dp_mesh is not None and mem.shard_student:
            shard_model(self.student, dp_mesh)
        self.check_positions()
        self.student_head = LogitHead(self.student, self.placement.columns)
        self.bind_rollout_engine()
        choose_cpu_threads([self.student, self.teacher], self.device)

    @property
    def teacher_head(self) -> LogitHead | None:
        """A local teacher's LM head (None for a served teacher)."""
        return getattr(self.placement, "head", None)

    def max_sequence_len(self) -> int:
        """The longest prompt + response this run can send the teacher, read off the student's config (no weights)."""
        from transformers import AutoConfig

        opts = self.rollout_options
        config = AutoConfig.from_pretrained(resolve_model_path(self.student_path))
        limit = getattr(config.get_text_config(), "max_position_embeddings", None)
        return min(opts.max_prompt_len + opts.max_new_tokens, limit or 2**31)

    def check_positions(self) -> None:
        """A response limit beyond the student's position limit is refused before any weights are used (prompts
        that with their response run past it are warned about when they come, in `encode`)."""
        limit = getattr(self.student.config.get_text_config(), "max_position_embeddings", None)
        opts = self.rollout_options
        if limit is None:
            return
        if opts.max_new_tokens >= limit:
            raise ValueError(f"rollout.max_new_tokens={opts.max_new_tokens} does not fit the student's "
                             f"{limit} positions ({self.student_path}: max_position_embeddings); use fewer than {limit}")

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
        with timer("forward"):
            hidden = self.hidden_states(rollout, plan)
        path = LossPath(self, hidden, rollout, plan)  # one projection, or score -> select -> loss
        with timer("score"):
            stats = path.score()
        with timer("select"):
            keep = path.select(stats)
        record = StepRecord(rollout, stats, keep, timer.seconds, plan)
        self.warn_if_nothing_kept(keep)
        bad = stats.non_finite_models()
        if self.skip_non_finite(not bad, f"{' and '.join(bad)} log-probs ({self.checkpoints_of(bad)})"):
            self.log_step_number(stepped=False)
            return {"record": record}
        with timer("loss"):
            loss = path.backward(keep, stats)
        with timer("optimizer"):
            stepped = self.optimizer_step()
        self.log_step_number(stepped)
        self.log_step(loss, timer.seconds, rows=rollout.response_mask.shape[0])
        return {"loss": loss, "record": record} if stepped else {"record": record}

    def warn_if_nothing_kept(self, keep: torch.Tensor) -> None:
        """Once per run: a step whose selector kept no position of the whole batch trains on nothing."""
        if not self.warned_nothing_kept and int(all_reduce_sum(keep.sum())) == 0:
            self.warned_nothing_kept = True
            rank_zero_warn(f"the selector {type(self.selector).__name__} kept no response token in step "
                           f"{self.global_step + 1}: that step trains on nothing (every response empty, or a plugin "
                           "selector that keeps none); check the selector's budget and the responses")

    def log_step_number(self, stepped: bool) -> None:
        """The x-axis of this step's logged points: its number, counted from 1 (Lightning's own counter is one
        behind during training), so step 50's loss and the validation after it both sit at 50, as the console
        says. A skipped update does not advance global_step, hence + 1 then."""
        self.log("step", float(self.global_step + (0 if stepped else 1)), batch_size=1)
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)

    def log_step(self, loss: torch.Tensor, seconds: dict[str, float], rows: int) -> None:
        self.log("train/loss", loss, prog_bar=True, batch_size=rows)
        self.log_dict({f"time/{k}": v for k, v in seconds.items()}, batch_size=1)
        metrics = self.placement.step_metrics()  # a served teacher's wire bytes, waits, retries
        if metrics:
            self.log_dict(metrics, batch_size=1)

    def plan(self, rows: int) -> StepPlan:
        """The plan of a step over `rows` rollout rows (`opdlab.step.plan_step`)."""
        return plan_step(
            rows, micro_batch_size=self.memory_options.micro_batch_size, chunk_size=self.memory_options.chunk_size,
            keeps_every_valid_position=self.selector.keeps_every_valid_position,
            full_kl=self.selector.needs_full_kl, full_entropy=self.scores_full_entropy,
            loss_denominator=self.training_options.loss_normalization, shared_projection=self.head_is_local,
            topk_lists=getattr(self.selector, "needs_topk_lists", False),
        )

    @property
    def head_is_local(self) -> bool:
        """The student's LM head is a local plain-linear layer (or not loaded yet). A sharded one (FSDP2) takes
        `head_loss`'s autograd path, all rows at once, so the plan does not also put the scoring there."""
        head = getattr(self, "student_head", None)
        return head is None or head.is_plain_linear

    def on_fit_start(self) -> None:
        """Print the step plan of a full batch and the teacher's placement once, before training starts."""
        batch_size = getattr(self.trainer.datamodule, "batch_size", None) if self.trainer.datamodule else None
        if batch_size:
            rank_zero_info(f"opdlab: {self.plan(batch_size * self.rollout_options.num_samples).describe()}")
        rank_zero_info(f"opdlab: {self.placement.describe()}")
        if is_adapted(self.student):
            rank_zero_info(f"opdlab: {describe(self.student)}")
        signal = self.placement.signal
        if signal.top_logprobs is not None and self.selector.top_k > signal.top_logprobs:
            rank_zero_warn(f"the selector's top_k={self.selector.top_k} is above the {signal.top_logprobs} log-probs the "
                           f"teacher sends per position: D's union uses the teacher's top-{signal.top_logprobs} "
                           "(docs/method.md §2.6)")

    @torch.no_grad()
    def token_stats(self, rollout: Rollout, top_k: int | None = None, full_kl: bool | None = None,
                    full_entropy: bool | None = None) -> TokenStats:
        """The selection statistics of every valid position of `rollout`, as a training step scores them (no
        grad; for analyses: `opdlab diagnose`'s bank, benchmarks/disagreement_census.py). `top_k`, `full_kl` and
        `full_entropy` override what the selector asks for."""
        rows = rollout.response_mask.shape[0]
        plan = replace(self.plan(rows), micro_batches=(slice(0, rows),), shared_projection=False)
        plan = replace(plan, **{k: v for k, v in (("full_kl", full_kl), ("full_entropy", full_entropy)) if v is not None})
        return self.score([self.response_hidden_states(rollout, student_grad=False)], rollout, plan, top_k)

    def replace_student(self, path: str) -> None:
        """Swap in another checkpoint of the student (e.g. one trained elsewhere) on the current student's device,
        in the module's student dtype: tokenizer and vocabulary checked against the loaded models, head and
        rollout engine rebuilt for it."""
        check_tokenizers_compatible(self.tokenizer, load_tokenizer(path))
        device = next(self.student.parameters()).device
        self.student = load_causal_lm(path, self.memory_options.student_dtype).to(device).eval()
        self.student_path = path
        self.student_head = LogitHead(self.student, self.placement.vocab_columns(self.student, self.tokenizer))
        self.bind_rollout_engine()

    def encode(self, batch: dict) -> PromptBatch:
        opts = self.rollout_options
        prompts = encode_prompts(
            self.tokenizer, batch["prompts"], batch["answers"], opts.max_prompt_len, opts.on_long_prompt,
            chat_template=self.chat_template,
        )
        self.warn_unknown_tokens(prompts, batch["prompts"])
        self.warn_past_positions(prompts)
        return prompts

    def warn_past_positions(self, prompts: PromptBatch) -> None:
        """Once per run: prompts whose response could run past the student's position limit."""
        limit = getattr(self.student.config.get_text_config(), "max_position_embeddings", None)
        longest = int(prompts.attention_mask.sum(1).max()) if prompts.attention_mask.numel() else 0
        if self.warned_positions or limit is None or longest + self.rollout_options.max_new_tokens <= limit:
            return
        self.warned_positions = True
        rank_zero_warn(f"a prompt of {longest} tokens + rollout.max_new_tokens={self.rollout_options.max_new_tokens} "
                       f"exceeds the student's {limit} positions ({self.student_path}): its response runs past what "
                       "the model was built for; lower max_new_tokens or max_prompt_len")

    def warn_unknown_tokens(self, prompts: PromptBatch, texts: list[str]) -> None:
        """Warn once per run when the tokenizer cannot represent some prompt characters (it maps them to
        its unknown token or drops them, e.g. natural language on the character-level toy): the models
        cannot read them, and accuracy would otherwise just read 0% with no hint why. Checked by decoding:
        characters of a (not truncated) prompt missing from its decoded tokens."""
        if self.warned_unknown_tokens or self.chat_template:
            return
        decoded = self.tokenizer.batch_decode(prompts.input_ids.tolist(), skip_special_tokens=True)
        lengths = prompts.attention_mask.sum(1).tolist()
        for text, back, length in zip(texts, decoded, lengths, strict=True):
            lost = sorted(set(text) - set(back) - set(" \t\n"))
            if lost and length < self.rollout_options.max_prompt_len:
                self.warned_unknown_tokens = True
                rank_zero_warn(f"the tokenizer of {self.student_path} cannot represent characters {''.join(lost)[:20]!r} "
                               f"of prompts such as {text[:60]!r} (unknown token, or dropped): the models cannot read "
                               "them; check the data or the tokenizer")
                return

    def prompt_seeds(self, batch: dict) -> list[int] | None:
        """One sampling seed per prompt, from its stream index: samples do not depend on batch splits."""
        if "indices" not in batch:
            return None
        return [derive_seed(self.training_options.seed, int(i)) for i in batch["indices"]]

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
        """Where a run is, for error messages: 'in training step 12 (11 steps completed, checkpoints saved
        so far are intact; continue with --resume)', 'in validation at step 50', ..."""
        if self._trainer is None:
            return "outside a Trainer"
        step = self.global_step
        if self.trainer.training:
            folder = getattr(self.trainer.checkpoint_callback, "dirpath", None)
            saved = any(Path(folder).glob("*.ckpt")) if folder else False
            kept = ("checkpoints saved so far are intact: continue with --resume" if saved else
                    "no checkpoint was saved yet" if self.trainer.checkpoint_callbacks else
                    "this fit saves no checkpoints")
            return f"in training step {step + 1} ({step} steps completed; {kept})"
        return f"in {'validation' if self.trainer.validating else 'evaluation'} at step {step}"

    def hidden_states(self, rollout: Rollout, plan: StepPlan) -> Hidden:
        """The student's hidden states and the teacher's rows of each micro-batch; the student's keep their graph
        when the loss reuses this forward (one micro-batch). A served teacher's requests go out first and run
        while the student's forward does."""
        pending = self.request_teacher(rollout)
        return [(self.student_hidden_states(rollout.rows(rows), plan.reuse_student_graph), self.teacher_rows(pending, rows))
                for rows in plan.micro_batches]

    def request_teacher(self, rollout: Rollout) -> PendingTeacher:
        with self.teacher_failures():
            return self.placement.request(rollout)

    def teacher_rows(self, pending: PendingTeacher, rows: slice) -> TeacherRows:
        with self.teacher_failures():
            return pending.rows(rows)

    @contextmanager
    def teacher_failures(self):
        """A served teacher that fails (after its retries) ends the run with one line naming the step."""
        from opdlab.teachers.vllm_server import TeacherServerError

        try:
            yield
        except TeacherServerError as err:
            raise TeacherServerError(f"{err} {self.stage_name()}") from None

    def student_hidden_states(self, rollout: Rollout, student_grad: bool = True) -> torch.Tensor:
        """(N, L, H) student hidden states that predict each response token."""
        with torch.set_grad_enabled(student_grad):
            hidden = final_hidden_states(self.student, rollout.input_ids, rollout.attention_mask)
        return hidden[:, response_positions(rollout)]

    def response_hidden_states(self, rollout: Rollout, student_grad: bool = True) -> tuple[torch.Tensor, TeacherRows]:
        """The student's (N, L, H) hidden states that predict each response token, and the teacher's rows there."""
        pending = self.request_teacher(rollout)
        return self.student_hidden_states(rollout, student_grad), self.teacher_rows(pending, slice(0, rollout.response_mask.shape[0]))

    def score_with_loss(self, hidden: Hidden, rollout: Rollout, plan: StepPlan) -> tuple[TokenStats, HeadLoss]:
        """The statistics and the loss of every valid position from one projection of each chunk (the plan's
        shared path: every valid position is kept, one micro-batch, a local head)."""
        (student_hidden, teacher_hidden), valid = hidden[0], rollout.response_mask.bool()
        rows = kept_rows(valid, student_hidden, teacher_hidden, rollout)
        scoring = Scoring(self.selector.top_k, plan.full_kl, plan.full_entropy, plan.topk_lists)
        loss = head_loss(rows, self.student_head, self.teacher_head, self.divergence,
                         loss_scale(plan.loss_denominator, valid, valid), plan.score_chunk_rows, scoring=scoring)
        return scatter_rows(loss.stats, rows.index, valid, scoring.top_k, plan.full_kl, plan.full_entropy,
                            plan.topk_lists), loss

    def score(self, hidden: Hidden, rollout: Rollout, plan: StepPlan, top_k: int | None = None) -> TokenStats:
        """The statistics of every valid position, without grad, micro-batch by micro-batch (K: the selector's
        `top_k` unless given)."""
        return TokenStats.cat([
            compute_token_stats(s.detach(), t, part.response_ids, part.response_mask, self.student_head,
                                self.teacher_head, top_k or self.selector.top_k, plan.score_chunk_rows, plan.full_kl,
                                plan.full_entropy, plan.topk_lists)
            for (s, t), part in zip(hidden, (rollout.rows(r) for r in plan.micro_batches), strict=True)
        ])

    def request_full_entropy(self) -> None:
        """Ask the scoring pass for the full-vocabulary entropies (`TokenStats.student_entropy`,
        `teacher_entropy`) from now on; callbacks that read them call this in `setup`. They cost two
        extra passes over every chunk's logits, so no step computes them unless asked."""
        self.full_entropy_requested = True

    @property
    def scores_full_entropy(self) -> bool:
        return self.full_entropy_requested or getattr(self.selector, "needs_full_entropy", False)

    def select(self, stats: TokenStats) -> torch.Tensor:
        """Keep mask for this rank's rows; the budget and normalisation are global across ranks."""
        everything, (offset, count, length) = gather_stats(stats)
        # The same generator on every rank, so a random selector draws one global choice.
        keep = self.selector.select(everything, generator=self.step_generator(salt=1, device="cpu", per_rank=False))
        expected = tuple(everything.valid.shape)
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != expected:
            got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise ValueError(f"selector {type(self.selector).__name__} returned a keep mask of {got}; expected "
                             f"torch.bool {expected} (one entry per response position of the whole batch)")
        keep = keep[offset : offset + count, :length]
        if (keep & ~stats.valid).any():
            raise RuntimeError(f"selector {type(self.selector).__name__} kept positions outside the response mask")
        return keep

    def backward_loss(self, hidden: Hidden, keep: torch.Tensor, rollout: Rollout, stats: TokenStats,
                      plan: StepPlan) -> torch.Tensor:
        """Backpropagate the loss of the kept rows, micro-batch by micro-batch; returns its global value.

        Every micro-batch's head loss carries the same `loss_scale` (the global count and the world-size
        factor), so the update equals the single-process update on the whole batch.
        """
        scale = loss_scale(plan.loss_denominator, keep, stats.valid)
        total = torch.zeros((), device=self.device)
        for (student_hidden, teacher_hidden), rows in zip(hidden, plan.micro_batches, strict=True):
            part = rollout.rows(rows)
            if not plan.reuse_student_graph:
                student_hidden = self.student_hidden_states(part, student_grad=True)
            loss = head_loss(kept_rows(keep[rows], student_hidden, teacher_hidden, part, stats.teacher_token_logp[rows]),
                             self.student_head, self.teacher_head, self.divergence, scale, plan.loss_chunk_rows,
                             plan.store_rows).loss
            self.manual_backward(loss)
            total += loss.detach()
        return global_loss(total)

    def checkpoints_of(self, models: list[str]) -> str:
        """The checkpoints behind the named models ('student', 'teacher'), for error messages."""
        paths = {"student": self.student_path, "teacher": self.teacher_path}
        return ", ".join(f"{m} {paths[m]}" for m in models)

    def optimizer_step(self) -> bool:
        """Clip, check the gradient norm, step. A non-finite norm skips the update (see skip_non_finite)."""
        optimizer = self.optimizers()
        params = [p for p in self.student.parameters() if p.grad is not None]
        max_norm = self.training_options.gradient_clip_val or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if self.skip_non_finite(bool(torch.isfinite(norm)), "gradient norm"):
            optimizer.zero_grad(set_to_none=True)
            return False
        optimizer.step()
        self.engine_weights_stale = True
        optimizer.zero_grad(set_to_none=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self.log("train/grad_norm", norm.float(), batch_size=1)
        return True

    def skip_non_finite(self, finite: bool, what: str) -> bool:
        """Agree across ranks whether this step is finite; count, warn, and stop after too many in a row."""
        bad = all_reduce_sum(torch.tensor(0.0 if finite else 1.0, device=self.device)) > 0
        if not bad:
            self.bad_steps_in_a_row = 0
            return False
        self.skipped_steps += 1
        self.bad_steps_in_a_row += 1
        limit = self.training_options.max_bad_steps
        if self.bad_steps_in_a_row > limit:
            raise NonFiniteTraining(
                f"non-finite {what} in {self.bad_steps_in_a_row} consecutive steps (limit max_bad_steps={limit}); "
                f"stopped {self.stage_name()}; nothing non-finite was exported. Lower the learning rate, check the "
                "teacher in float32, or raise max_bad_steps."
            )
        rank_zero_warn(f"non-finite {what} at step {self.global_step}: skipping this update "
                       f"({self.skipped_steps} skipped so far)")
        return True

    # ----------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        prompts = self.encode(batch)
        self.val_accuracy.update(self.correct(prompts, self.rollout(prompts, greedy=True)))
        if not self.teacher_evaluated:  # once per run, with the plain loop (the engine serves the student)
            with self.teacher_failures():
                teacher = self.placement.generate(prompts, self.rollout_options.max_new_tokens, world_size() > 1)
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
            if float(teacher) == 0.0:
                rank_zero_warn(f"the teacher ({self.teacher_path}) answers 0% of the validation set correctly: the "
                               "data's answers and its verifier disagree with what the models write, or this is not "
                               "the teacher you meant; distilling it teaches nothing the verifier accepts")

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
        step = self.global_step if self._trainer is not None else 0
        gen = torch.Generator(device=device or self.device)
        gen.manual_seed(derive_seed(self.training_options.seed, step, rank, salt))
        return gen

    def configure_optimizers(self):
        try:
            # The trainable parameters only: with an adapter, the frozen base gets no optimizer state.
            optimizer = self.optimizer_factory([p for p in self.student.parameters() if p.requires_grad])
        except (ValueError, TypeError) as err:  # torch's own checks (e.g. "Invalid learning rate: -0.1")
            raise ValueError(f"--model.optimizer: {err}; fix its init_args (e.g. --model.optimizer.init_args.lr)") from err
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The teacher is frozen and reloaded from its path; keeping it out makes checkpoints student-sized. With an
        # adapter the frozen base is reloaded too: only the adapter's weights are kept.
        kept = self.saved_student_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith(("teacher.", "student.")) or k in kept}
        # Sampling is seeded per prompt and step; the global RNGs are saved too, for user code that uses them.
        checkpoint["opdlab"] = {"rng": capture_rng_state(), "skipped_steps": self.skipped_steps,
                                "adapter": self.adapter_signature()}

    def saved_student_keys(self) -> set[str]:
        """The state-dict keys a checkpoint holds: the student's (the adapter's alone when it has one)."""
        if not is_adapted(self.student):
            return {k for k in self.state_dict() if k.startswith("student.")}
        return {f"student.{name}" for name, param in self.student.named_parameters() if param.requires_grad}

    def adapter_signature(self) -> dict | None:
        """What an adapter's weights mean (rank, alpha, targets); None for full fine-tuning."""
        config = adapter_config(self.student)
        if config is None:
            return None
        return {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.engine_weights_stale = True  # the restored weights replace the student's after this hook
        saved = checkpoint.get("opdlab", {}).get("adapter", None)
        if "opdlab" in checkpoint and saved != self.adapter_signature():
            def kind(signature: dict | None) -> str:
                return "full fine-tuning" if signature is None else f"the LoRA adapter {signature}"

            raise ValueError(f"the checkpoint was trained with {kind(saved)}, this run has "
                             f"{kind(self.adapter_signature())}; continue it with the same --model.student_adapter.* options")
        missing = sorted(self.saved_student_keys() - set(checkpoint["state_dict"]))
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} student weights (e.g. {missing[:3]}); is it an opdlab checkpoint?")
        if "opdlab" in checkpoint:
            restore_rng_state(checkpoint["opdlab"]["rng"])
            self.skipped_steps = checkpoint["opdlab"]["skipped_steps"]

    def export_student(self, path: str) -> None:
        """Save the student as a plain HF checkpoint (with its tokenizer). Call on every rank."""
        bad = non_finite_parameters(self.student)  # this rank's weights (its shards under FSDP), before any gather
        if int(all_reduce_sum(torch.tensor(float(len(bad)), device=self.device))):  # every rank refuses together
            raise OpdlabError(f"the trained student's weights hold NaN or inf{f' in {len(bad)} tensor(s) (e.g. {bad[0]})' if bad else ''}; "
                              f"it was not exported to {path}. Check the loss curve and train/grad_norm; the "
                              "checkpoints saved during training are kept (resume from an earlier one with --ckpt_path)")
        if is_adapted(self.student):
            self.export_adapter(path)
            return
        state_dict = None
        if is_sharded(self.student):  # gather the full weights (a collective: every rank takes part)
            state_dict = get_model_state_dict(self.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.global_rank == 0:
            self.student.save_pretrained(path, state_dict=state_dict)
            self.tokenizer.save_pretrained(path)
            readable_by_default(path)

    def export_adapter(self, path: str) -> None:
        """An adapted student's export: the adapter in peft's format (its base recorded as this run's student) with
        the tokenizer, and with `student_adapter.export_merged` the merged plain model in `<path>/merged`."""
        from opdlab.adapters import adapter_state, merged_copy

        state = adapter_state(self.student)  # gathered on every rank (collectives) before rank 0 writes
        merged = merged_copy(self.student) if self.adapter_options.export_merged else None
        if self.global_rank == 0:
            save_adapter(self.student, path, self.student_path, state)
            self.tokenizer.save_pretrained(path)
            readable_by_default(path)
            if merged is not None:
                merged.save_pretrained(f"{path}/merged")
                self.tokenizer.save_pretrained(f"{path}/merged")
                readable_by_default(f"{path}/merged")


SMALL_MODEL_PARAMETERS = 50_000_000  # below this (student + teacher), one CPU thread: see choose_cpu_threads


def choose_cpu_threads(models: list, device: torch.device) -> int:
    """On a CPU, for small models and when OMP_NUM_THREADS is not set: one torch thread. Reproducible and robust
    rather than fastest: the thread count changes the rounding (and so the trained result) on some CPUs, and while
    on an idle 2-core machine two threads train the toy ~1.5x faster, with one or two other jobs on the machine they
    are 2-3.3x slower (each small product waits for a busy core; benchmarks/results/cpu_threads.md). Set
    OMP_NUM_THREADS to choose yourself (it is then left alone). Returns the torch thread count in use."""
    import os

    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    total = sum(p.numel() for m in models if m is not None for p in m.parameters())
    if total < SMALL_MODEL_PARAMETERS and torch.get_num_threads() != 1:
        rank_zero_info(f"opdlab: CPU with small models ({total / 1e6:.1f}M parameters): 1 torch thread instead of "
                       f"{torch.get_num_threads()} (steady on a shared machine; set OMP_NUM_THREADS to choose)")
        torch.set_num_threads(1)
    return torch.get_num_threads()


def non_finite_parameters(model: torch.nn.Module) -> list[str]:
    """The names of floating-point parameters holding NaN or inf (local shards of sharded ones)."""
    bad = []
    for name, weight in model.named_parameters():
        local = weight.to_local() if hasattr(weight, "to_local") else weight
        if local.is_floating_point() and local.numel() and not bool(torch.isfinite(local.detach()).all()):
            bad.append(name)
    return bad


def readable_by_default(folder: str) -> None:
    """Give the files of an exported checkpoint the permissions a new file gets here (the umask): transformers
    writes the weights through a private temporary file (mode 0600), so other users and jobs could not read them."""
    import os
    from pathlib import Path

    umask = os.umask(0)
    os.umask(umask)
    for file in Path(folder).iterdir():
        if file.is_file():
            file.chmod(0o666 & ~umask)
