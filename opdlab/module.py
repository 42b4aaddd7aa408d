"""The LightningModule: a trainable student and a frozen teacher, one OPD step per batch.

`training_step` reads as the data-flow diagram of docs/method.md §1:

    prompts --rollout--> Rollout --score--> TokenStats --select--> keep mask --loss--> scalar

The student runs one forward *with grad* to its final hidden states; selection features come from the
LM heads applied chunk by chunk without grad; the student head is then applied with grad to the kept
rows only. The teacher never materialises full-sequence logits either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric

from opdlab.checkpointing import capture_rng_state, restore_rng_state
from opdlab.distributed import all_reduce_sum, gather_stats, world_size
from opdlab.divergences import Divergence, SampledTokenOPD
from opdlab.engines import RolloutEngine, SamplingParams, StaticCacheEngine
from opdlab.loss import LossNormalization, kept_token_loss, reduce_token_loss, score_and_loss_all_rows
from opdlab.microbatch import cat_stats, micro_batches, non_finite_models, rollout_rows, stats_rows
from opdlab.models import (
    LogitHead,
    check_tokenizers_compatible,
    check_vocab_sizes,
    final_hidden_states,
    freeze,
    load_causal_lm,
    load_tokenizer,
)
from opdlab.rollout import PromptBatch, Rollout, decode_responses, encode_prompts, sample_rollouts
from opdlab.scoring import TokenStats, compute_token_stats
from opdlab.selectors import FullSelector, TokenSelector
from opdlab.sharding import is_sharded, shard_model
from opdlab.timing import StageTimer


@dataclass
class StepRecord:
    """What one training step selected, for callbacks (no hidden states or logits are kept)."""

    rollout: Rollout
    stats: TokenStats
    keep: torch.Tensor  # (N, L) bool
    seconds: dict[str, float]


def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


class OPDModule(L.LightningModule):
    """On-policy distillation of `student` from a frozen `teacher`, with a token selector.

    Args:
        student: student checkpoint: local directory, hub id, or `toy:<name>/student`.
        teacher: teacher checkpoint, same forms. Its tokenizer must equal the student's.
        selector: which response positions get the loss (default: all of them, full-token OPD).
        divergence: the per-token loss at kept positions (default: the paper's sampled-token OPD).
        optimizer: optimizer factory, applied to the student's parameters only.
        scheduler: optional learning-rate scheduler factory (stepped every optimizer step).
        num_samples: responses sampled per prompt.
        max_new_tokens: response length limit for training rollouts and validation.
        temperature: rollout sampling temperature (> 0 for training).
        top_p: rollout nucleus-sampling threshold in (0, 1].
        max_prompt_len: prompt length limit in tokens.
        on_long_prompt: `truncate` (keep the last max_prompt_len tokens, with a warning) or `error`.
        loss_normalization: `kept` (mean over kept tokens) or `valid` (sum over kept tokens divided by the
            number of valid response tokens). See `opdlab.loss.reduce_token_loss`.
        chunk_size: response rows whose logits the scoring pass materialises at once (about
            3 · chunk_size · V fp32 in all); the loss pass uses chunks of a quarter of it and, when at
            most 2 · chunk_size rows are kept, keeps their logit gradients (kept rows x V) so the LM
            head's gradients take one matmul each instead of one per chunk.
        student_dtype: the student's weight dtype: float32 (default; with bf16-mixed training these are the fp32
            master weights), bfloat16 or float16.
        teacher_dtype: the frozen teacher's weight dtype: float32, bfloat16 (halves its memory; the GPU configs
            use it) or float16.
        gradient_checkpointing: recompute student activations in backward to save memory.
        micro_batch_size: rows (prompts x samples) per forward/backward; the whole batch when None.
            Selection and loss normalisation always cover the whole batch (and all ranks), so the update
            does not depend on this value; with several micro-batches the student forward runs twice
            (no-grad for scoring, with grad on each micro-batch for the loss).
        gradient_clip_val: clip the student's gradient norm to this value (None: no clipping).
        max_bad_steps: consecutive steps with non-finite log-probs or gradients that are skipped (with a
            warning, counted in `train/skipped_steps`) before training stops with an error.
        shard_student: under a sharding strategy (ModelParallelStrategy), shard the student with FSDP2
            as well as the teacher; the teacher is always sharded there.
        seed: seed of rollout sampling (per prompt, from its stream index) and of random selection.
        rollout_engine: what generates the student's responses (training rollouts, greedy validation, the
            diagnostic's bank): `static` (default: static KV cache, decode step compiled into a CUDA graph on
            GPUs), `reference` (the plain eager loop the others are tested against), or a plugin's engine
            (entry-point group `opdlab.rollout_engines`). See `opdlab.engines`.
        per_response_floor: keep at least one position of every non-empty response (the budget rule of docs/method.md §2.4,
            the default). With short responses this dominates small budgets (4-5-token toy answers:
            "5%" keeps ~20%); False keeps exactly ceil(ratio · valid tokens) over the batch, so some
            responses get no loss at all.
    """

    def __init__(
        self,
        student: str = "toy:add3/student",
        teacher: str = "toy:add3/teacher",
        selector: TokenSelector | None = None,
        divergence: Divergence | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        num_samples: int = 1,
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_prompt_len: int = 512,
        on_long_prompt: Literal["truncate", "error"] = "truncate",
        loss_normalization: LossNormalization = "kept",
        chunk_size: int = 256,
        student_dtype: str = "float32",
        teacher_dtype: str = "float32",
        gradient_checkpointing: bool = False,
        micro_batch_size: int | None = None,
        gradient_clip_val: float | None = None,
        max_bad_steps: int = 5,
        shard_student: bool = True,
        seed: int = 0,
        per_response_floor: bool = True,
        rollout_engine: RolloutEngine | None = None,
    ) -> None:
        super().__init__()
        if num_samples < 1 or max_new_tokens < 1:
            raise ValueError(f"num_samples and max_new_tokens must be >= 1, got {num_samples} and {max_new_tokens}")
        if temperature <= 0:
            raise ValueError(f"training temperature must be > 0 (on-policy sampling), got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus truncation), got {top_p}")
        if max_prompt_len < 1:
            raise ValueError(f"max_prompt_len must be >= 1 token, got {max_prompt_len}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 row, got {chunk_size}")
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            raise ValueError(f"gradient_clip_val must be > 0 (a maximum gradient norm) or null for no clipping, "
                             f"got {gradient_clip_val}")
        if max_bad_steps < 0:
            raise ValueError(f"max_bad_steps must be >= 0 (0: stop at the first non-finite step), got {max_bad_steps}")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size}")
        if loss_normalization not in ("kept", "valid"):
            raise ValueError(f"loss_normalization must be 'kept' or 'valid', got {loss_normalization!r}")
        self.save_hyperparameters(ignore=["selector", "divergence", "optimizer", "scheduler", "rollout_engine"])
        self.student_path, self.teacher_path = student, teacher
        self.selector = selector if selector is not None else FullSelector()
        self.selector.per_response_floor = per_response_floor
        self.divergence = divergence if divergence is not None else SampledTokenOPD()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.rollout_engine = rollout_engine if rollout_engine is not None else StaticCacheEngine()
        self.engine_weights_stale = True  # the engine takes the student's weights before its next rollout
        self.student = self.teacher = self.tokenizer = None
        self.val_accuracy = MeanMetric()
        self.teacher_accuracy = MeanMetric()
        self.teacher_evaluated, self.teacher_val_accuracy = False, None
        self.last_step: StepRecord | None = None
        self.last_val_accuracy, self.last_val_step = float("nan"), -1
        self.response_tokens = 0  # valid response tokens sampled in training, this process
        self.strict_loading = False  # checkpoints leave out the frozen teacher (see on_save_checkpoint)
        self.fuse_full_selection = True  # see keeps_every_position; off only to test the two paths agree
        self.full_entropy_requested = False  # see request_full_entropy
        self.warned_unknown_tokens = False  # see warn_unknown_tokens
        self.accuracy_before: float | None = None  # held-out accuracy before training (set by `opdlab fit`)
        self.automatic_optimization = False  # global selection spans micro-batches: see training_step
        self.skipped_steps = self.bad_steps_in_a_row = 0

    # ----------------------------------------------------------------------------- models
    def configure_model(self) -> None:
        """Load tokenizers (and check them) before any weights, then the student and the frozen teacher."""
        if self.student is not None:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(self.student_path)
        check_tokenizers_compatible(self.tokenizer, load_tokenizer(self.teacher_path))
        if self.selector.top_k > len(self.tokenizer):  # checked before any weights load
            raise ValueError(f"selector top_k={self.selector.top_k} exceeds the vocabulary ({len(self.tokenizer)} "
                             f"tokens of {self.student_path}); use top_k <= {len(self.tokenizer)}")
        self.student = load_causal_lm(self.student_path, hp.student_dtype)
        self.teacher = freeze(load_causal_lm(self.teacher_path, hp.teacher_dtype))
        self.student.train()  # from_pretrained returns eval mode: dropout and checkpointing need train
        if hp.gradient_checkpointing:
            self.student.gradient_checkpointing_enable()
        mesh = self.device_mesh if self._trainer is not None else None
        if mesh is not None:  # ModelParallelStrategy: FSDP2 over its data-parallel mesh
            dp_mesh = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
            shard_model(self.teacher, dp_mesh)
            if hp.shard_student:
                shard_model(self.student, dp_mesh)
        columns = check_vocab_sizes(self.student, self.teacher, self.tokenizer)
        self.student_head = LogitHead(self.student, columns)
        self.teacher_head = LogitHead(self.teacher, columns)
        self.bind_rollout_engine()

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
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        """rollout -> score -> select -> loss, then one optimizer step (manual optimisation)."""
        timer = StageTimer(self.device)
        with timer("rollout"):
            rollout = self.rollout(self.encode(batch), seeds=self.prompt_seeds(batch))
        parts = micro_batches(rollout.response_mask.shape[0], self.hparams.micro_batch_size)
        with timer("forward"):  # one micro-batch: the student forward with grad is reused by the loss
            hidden = [self.response_hidden_states(rollout_rows(rollout, r), student_grad=len(parts) == 1) for r in parts]
        token_loss = None
        if self.keeps_every_position(parts):  # ratio 1: the keep mask is known before any score
            with timer("score"):  # scoring and loss share one LM-head projection per chunk
                stats, token_loss = score_and_loss_all_rows(
                    *hidden[0], rollout, self.student_head, self.teacher_head, self.divergence,
                    self.selector.top_k, self.hparams.chunk_size, self.selector.needs_full_kl,
                    self.scores_full_entropy,
                )
            keep = stats.valid.clone()
        else:
            with timer("score"):
                stats = cat_stats([self.score(s, t, rollout_rows(rollout, r)) for (s, t), r in zip(hidden, parts, strict=True)])
            with timer("select"):
                keep = self.select(stats)
        self.last_step = StepRecord(rollout, stats, keep, timer.seconds)
        self.response_tokens += int(rollout.response_mask.sum())
        bad_models = non_finite_models(stats)
        if self.skip_non_finite(bad_models is None, f"{bad_models} log-probs ({self.describe(bad_models)})"):
            return None
        with timer("loss"):  # kept-rows forward (again, when accumulating micro-batches) + backward
            loss = self.backward_loss(hidden, parts, keep, rollout, stats, token_loss)
        with timer("optimizer"):
            stepped = self.optimizer_step()
        self.log("train/loss", loss, prog_bar=True, batch_size=rollout.response_mask.shape[0])
        self.log_dict({f"time/{k}": v for k, v in timer.seconds.items()}, batch_size=1)
        return loss if stepped else None

    def encode(self, batch: dict) -> PromptBatch:
        hp = self.hparams
        prompts = encode_prompts(
            self.tokenizer, batch["prompts"], batch["answers"], hp.max_prompt_len, hp.on_long_prompt,
            chat_template=self.chat_template,
        )
        self.warn_unknown_tokens(prompts, batch["prompts"])
        return prompts

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
            if lost and length < self.hparams.max_prompt_len:
                self.warned_unknown_tokens = True
                rank_zero_warn(f"the tokenizer of {self.student_path} cannot represent characters {''.join(lost)[:20]!r} "
                               f"of prompts such as {text[:60]!r} (unknown token, or dropped): the models cannot read "
                               "them; check the data or the tokenizer")
                return

    def prompt_seeds(self, batch: dict) -> list[int] | None:
        """One sampling seed per prompt, from its stream index: samples do not depend on batch splits."""
        if "indices" not in batch:
            return None
        return [hash((self.hparams.seed, int(i))) % (2**63) for i in batch["indices"]]

    def rollout(self, prompts: PromptBatch, greedy: bool = False, seeds: list[int] | None = None) -> Rollout:
        """The student's responses with this run's sampling settings (greedy: one each, temperature 0)."""
        hp = self.hparams
        return self.generate(prompts, SamplingParams(
            num_samples=1 if greedy else hp.num_samples, max_new_tokens=hp.max_new_tokens,
            temperature=0.0 if greedy else hp.temperature, top_p=hp.top_p, seeds=None if greedy else seeds,
            generator=self.step_generator(), sync_ranks=world_size() > 1,
        ))

    def generate(self, prompts: PromptBatch, params: SamplingParams) -> Rollout:
        """Student rollouts from the engine, which first takes the weights of the last optimizer step."""
        if self.engine_weights_stale:
            self.rollout_engine.load_weights(self.student)
            self.engine_weights_stale = False
        return self.rollout_engine.generate(prompts, params)

    def response_hidden_states(
        self, rollout: Rollout, student_grad: bool = True, teacher: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, L, H) hidden states that predict each response token, for the student and the teacher."""
        p, length = rollout.prompt_len, rollout.response_mask.shape[1]
        cut = slice(p - 1, p - 1 + length)  # position p - 1 + t predicts response token t
        with torch.set_grad_enabled(student_grad):
            student = final_hidden_states(self.student, rollout.input_ids, rollout.attention_mask)[:, cut]
        if not teacher:
            return student, None
        with torch.no_grad():
            return student, final_hidden_states(self.teacher, rollout.input_ids, rollout.attention_mask)[:, cut]

    def score(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, rollout: Rollout) -> TokenStats:
        return compute_token_stats(
            student_hidden.detach(), teacher_hidden, rollout.response_ids, rollout.response_mask,
            self.student_head, self.teacher_head, top_k=self.selector.top_k,
            chunk_size=self.hparams.chunk_size, full_kl=self.selector.needs_full_kl,
            full_entropy=self.scores_full_entropy,
        )

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
        keep = keep[offset : offset + count, :length]
        if (keep & ~stats.valid).any():
            raise RuntimeError(f"selector {type(self.selector).__name__} kept positions outside the response mask")
        return keep

    def keeps_every_position(self, parts: list[slice]) -> bool:
        """True when selection is the identity (ratio 1 with the shared budget rule), in one micro-batch."""
        select = type(self.selector).select
        return (self.fuse_full_selection and len(parts) == 1 and self.selector.ratio >= 1.0
                and select in (TokenSelector.select, FullSelector.select))

    def backward_loss(self, hidden, parts, keep, rollout: Rollout, stats: TokenStats, token_loss=None) -> torch.Tensor:
        """Backpropagate sum(kept token losses) / global count, micro-batch by micro-batch.

        The denominator is counted over all ranks and micro-batches, and each rank's loss is scaled by the
        world size because data-parallel gradient reduction averages over ranks: the update equals the
        single-process update on the whole batch. Returns the global loss value (for logging).
        """
        count = keep.sum() if self.hparams.loss_normalization == "kept" else stats.valid.sum()
        denominator = all_reduce_sum(count.float())
        if token_loss is not None:  # already computed at every valid row (keeps_every_position)
            loss = reduce_token_loss(token_loss, denominator)
            self.manual_backward(loss * world_size())
            return all_reduce_sum(loss.detach())
        total = torch.zeros((), device=self.device)
        for (student_hidden, teacher_hidden), rows in zip(hidden, parts, strict=True):
            part = rollout_rows(rollout, rows)
            if not student_hidden.requires_grad:
                student_hidden, _ = self.response_hidden_states(part, student_grad=True, teacher=False)
            token_loss = kept_token_loss(
                student_hidden, teacher_hidden, keep[rows], part, stats_rows(stats, rows),
                self.student_head, self.teacher_head, self.divergence,
                chunk_size=max(1, self.hparams.chunk_size // 4),  # loss rows hold logits and their grads
                store_rows=2 * self.hparams.chunk_size,  # up to 2 scoring chunks: head weight read 2x, not 2x/chunk
            )
            loss = reduce_token_loss(token_loss, denominator)
            self.manual_backward(loss * world_size())
            total += loss.detach()
        return all_reduce_sum(total)

    def describe(self, models: str | None) -> str:
        """The checkpoints behind 'student', 'teacher' or 'student and teacher' (for error messages)."""
        paths = {"student": self.student_path, "teacher": self.teacher_path}
        return ", ".join(f"{m} {paths[m]}" for m in (models or "").split(" and ") if m in paths)

    def optimizer_step(self) -> bool:
        """Clip, check the gradient norm, step. A non-finite norm skips the update (see skip_non_finite)."""
        optimizer = self.optimizers()
        params = [p for p in self.student.parameters() if p.grad is not None]
        max_norm = self.hparams.gradient_clip_val or float("inf")
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
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)
        limit = self.hparams.max_bad_steps
        if self.bad_steps_in_a_row > limit:
            raise FloatingPointError(
                f"non-finite {what} in {self.bad_steps_in_a_row} consecutive steps (limit max_bad_steps={limit}); "
                "stopping. Lower the learning rate, check the teacher in float32, or raise max_bad_steps."
            )
        rank_zero_warn(f"non-finite {what} at step {self.global_step}: skipping this update "
                       f"({self.skipped_steps} skipped so far)")
        return True

    # ----------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        prompts = self.encode(batch)
        self.val_accuracy.update(self.greedy_accuracy(prompts, self.rollout(prompts, greedy=True)))
        if not self.teacher_evaluated:  # once per run, with the plain loop (the engine serves the student)
            teacher = sample_rollouts(self.teacher, prompts, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id,
                                      max_new_tokens=self.hparams.max_new_tokens, temperature=0.0,
                                      sync_ranks=world_size() > 1)
            self.teacher_accuracy.update(self.greedy_accuracy(prompts, teacher))

    def greedy_accuracy(self, prompts: PromptBatch, rollout: Rollout) -> torch.Tensor:
        texts = decode_responses(self.tokenizer, rollout)
        verify = self.trainer.datamodule.verify
        return torch.tensor([float(verify(t, a)) for t, a in zip(texts, prompts.answers, strict=True)])

    def on_validation_epoch_end(self) -> None:
        accuracy = self.val_accuracy.compute()
        self.log("val/accuracy", accuracy, prog_bar=True)
        self.val_accuracy.reset()
        self.last_val_accuracy, self.last_val_step = float(accuracy), self.global_step
        if not self.teacher_evaluated and not self.trainer.sanity_checking:
            self.teacher_val_accuracy = float(self.teacher_accuracy.compute())
            self.log("val/teacher_accuracy", self.teacher_val_accuracy)
            self.teacher_evaluated = True

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
        gen.manual_seed(hash((self.hparams.seed, step, rank, salt)) % (2**63))
        return gen

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.student.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The teacher is frozen and reloaded from its path; keeping it out makes checkpoints student-sized.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}
        # Sampling is seeded per prompt and step; the global RNGs are saved too, for user code that uses them.
        checkpoint["opdlab"] = {"rng": capture_rng_state(), "skipped_steps": self.skipped_steps,
                                "accuracy_before": self.accuracy_before}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.engine_weights_stale = True  # the restored weights replace the student's after this hook
        expected = {k for k in self.state_dict() if k.startswith("student.")}
        missing = sorted(expected - set(checkpoint["state_dict"]))
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} student weights (e.g. {missing[:3]}); is it an opdlab checkpoint?")
        if "opdlab" in checkpoint:
            restore_rng_state(checkpoint["opdlab"]["rng"])
            self.skipped_steps = checkpoint["opdlab"]["skipped_steps"]
            self.accuracy_before = checkpoint["opdlab"].get("accuracy_before", self.accuracy_before)

    def export_student(self, path: str) -> None:
        """Save the student as a plain HF checkpoint (with its tokenizer). Call on every rank."""
        state_dict = None
        if is_sharded(self.student):  # gather the full weights (a collective: every rank takes part)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state_dict = get_model_state_dict(self.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.global_rank == 0:
            self.student.save_pretrained(path, state_dict=state_dict)
            self.tokenizer.save_pretrained(path)
