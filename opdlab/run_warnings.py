"""What a run says while it trains, in one place: the once-per-run warnings (a step that kept nothing, prompts past
the student's positions, characters the tokenizer drops, a teacher the verifier never accepts, a selector K above
what a served teacher sends), the non-finite step guard, and where a run is for error messages.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from opdlab.console import OpdlabError
from opdlab.distributed import all_reduce_sum
from opdlab.rollout import PromptBatch


class NonFiniteTraining(OpdlabError, FloatingPointError):
    """Too many non-finite steps in a row: the fit stops (one line from the CLI); the checkpoints saved before stay."""


class RunWarnings:
    """Each warning at most once per run (the flags travel with the module, not with checkpoints)."""

    def __init__(self) -> None:
        self.said: set[str] = set()

    def once(self, key: str, message: str) -> None:
        if key not in self.said:
            self.said.add(key)
            rank_zero_warn(message)

    def nothing_kept(self, keep: torch.Tensor, selector: str, step: int) -> None:
        """A step whose selector kept no position of the whole batch trains on nothing."""
        if "nothing_kept" not in self.said and int(all_reduce_sum(keep.sum())) == 0:
            self.once("nothing_kept", f"the selector {selector} kept no response token in step {step}: that step "
                      "trains on nothing (every response empty, or a plugin selector that keeps none); check the "
                      "selector's budget and the responses")

    def past_positions(self, prompts: PromptBatch, limit: int | None, max_new_tokens: int, student: str) -> None:
        """Prompts whose response could run past the student's position limit."""
        longest = int(prompts.attention_mask.sum(1).max()) if prompts.attention_mask.numel() else 0
        if "past_positions" in self.said or limit is None or longest + max_new_tokens <= limit:
            return
        self.once("past_positions", f"a prompt of {longest} tokens + rollout.max_new_tokens={max_new_tokens} exceeds "
                  f"the student's {limit} positions ({student}): its response runs past what the model was built for; "
                  "lower max_new_tokens or max_prompt_len")

    def unknown_tokens(self, tokenizer, prompts: PromptBatch, texts: list[str], max_prompt_len: int, student: str) -> None:
        """The tokenizer cannot represent some prompt characters (it maps them to its unknown token or drops them,
        e.g. natural language on the character-level toy): the models cannot read them, and accuracy would
        otherwise just read 0% with no hint why. Checked by decoding: characters of a (not truncated) prompt
        missing from its decoded tokens."""
        if "unknown_tokens" in self.said:
            return
        decoded = tokenizer.batch_decode(prompts.input_ids.tolist(), skip_special_tokens=True)
        lengths = prompts.attention_mask.sum(1).tolist()
        for text, back, length in zip(texts, decoded, lengths, strict=True):
            lost = sorted(set(text) - set(back) - set(" \t\n"))
            if lost and length < max_prompt_len:
                self.once("unknown_tokens", f"the tokenizer of {student} cannot represent characters "
                          f"{''.join(lost)[:20]!r} of prompts such as {text[:60]!r} (unknown token, or dropped): the "
                          "models cannot read them; check the data or the tokenizer")
                return

    def teacher_never_right(self, accuracy: float, teacher: str) -> None:
        if accuracy == 0.0:
            self.once("teacher_zero", f"the teacher ({teacher}) answers 0% of the validation set correctly: the data's "
                      "answers and its verifier disagree with what the models write, or this is not the teacher you "
                      "meant; distilling it teaches nothing the verifier accepts")

    def announce(self, plan, placement, student, top_k: int) -> None:
        """At the start of a fit: the step plan of a full batch (when known), the teacher's placement, the adapter."""
        from opdlab.adapters import describe, is_adapted

        adapter = describe(student) if is_adapted(student) else None
        for line in (plan.describe() if plan is not None else None, placement.describe(), adapter):
            if line:
                rank_zero_info(f"opdlab: {line}")
        self.top_k_above_sent(top_k, placement.signal.top_logprobs)

    def top_k_above_sent(self, top_k: int, sent: int | None) -> None:
        if sent is not None and top_k > sent:
            self.once("top_k_above_sent", f"the selector's top_k={top_k} is above the {sent} log-probs the teacher "
                      f"sends per position: D's union uses the teacher's top-{sent} (docs/method.md §2.6)")


class NonFiniteGuard:
    """Counts non-finite steps (agreed across ranks), warns, and stops after `limit` in a row."""

    def __init__(self, limit: int) -> None:
        self.limit, self.skipped, self.in_a_row = limit, 0, 0

    def skip(self, finite: bool, what: str, step: int, where: str, device: torch.device) -> bool:
        """True when this step is to be skipped (some rank saw a non-finite `what`)."""
        bad = all_reduce_sum(torch.tensor(0.0 if finite else 1.0, device=device)) > 0
        if not bad:
            self.in_a_row = 0
            return False
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row > self.limit:
            raise NonFiniteTraining(
                f"non-finite {what} in {self.in_a_row} consecutive steps (limit max_bad_steps={self.limit}); "
                f"stopped {where}; nothing non-finite was exported. Lower the learning rate, check the "
                "teacher in float32, or raise max_bad_steps."
            )
        rank_zero_warn(f"non-finite {what} at step {step}: skipping this update ({self.skipped} skipped so far)")
        return True


def stage_name(trainer, step: int) -> str:
    """Where a run is, for error messages: 'in training step 12 (11 steps completed, checkpoints saved so far are
    intact; continue with --resume)', 'in validation at step 50', ... (`trainer` None: outside a Trainer)."""
    if trainer is None:
        return "outside a Trainer"
    if trainer.training:
        folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        saved = any(Path(folder).glob("*.ckpt")) if folder else False
        kept = ("checkpoints saved so far are intact: continue with --resume" if saved else
                "no checkpoint was saved yet" if trainer.checkpoint_callbacks else "this fit saves no checkpoints")
        return f"in training step {step + 1} ({step} steps completed; {kept})"
    return f"in {'validation' if trainer.validating else 'evaluation'} at step {step}"
