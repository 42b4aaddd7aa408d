"""Sampled rollouts as text in TensorBoard: what the student wrote, and which tokens got the loss."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from opdlab.callbacks.histograms import check_every_n_steps, is_logging_step, step_record


def render_row(tokenizer, ids: list[int], kept: list[bool]) -> str:
    """The response with kept (supervised) tokens in **bold**, token by token, up to EOS."""
    pieces = []
    for token_id, keep in zip(ids, kept, strict=True):
        text = tokenizer.decode([token_id]) if token_id != tokenizer.eos_token_id else "⏎"
        text = text.replace("|", "\\|").replace("\n", "↵")
        pieces.append(f"**{text}**" if keep and text.strip() else text)
    return "".join(pieces)


class RolloutSamples(L.Callback):
    """Every `every_n_steps` optimizer steps, a few of the step's rollouts as a markdown table in
    TensorBoard's Text tab (`rollouts/samples`): prompt, response with the kept tokens in bold, reference
    answer, and whether the verifier accepts the response. The first thing to read when a run goes wrong.

    Args:
        every_n_steps: log on the first optimizer step, then every n-th (1, n + 1, 2n + 1, ...), and on the
            last step of the run (what the trained student writes).
        num_rows: rollouts shown each time (the batch's first rows).
    """

    def __init__(self, every_n_steps: int = 50, num_rows: int = 4) -> None:
        self.every_n_steps = check_every_n_steps(every_n_steps)
        if num_rows < 1:
            raise ValueError(f"num_rows must be >= 1, got {num_rows}")
        self.num_rows = num_rows

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        record, step = step_record(outputs), trainer.global_step
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        last = trainer.max_steps is not None and step == trainer.max_steps
        if record is None or not writers or not trainer.is_global_zero or not (
                is_logging_step(step, self.every_n_steps) or last):
            return
        writer_text = self.table(pl_module.tokenizer, record, trainer.datamodule.verify)
        for writer in writers:
            writer.add_text("rollouts/samples", writer_text, global_step=step)

    def table(self, tokenizer, record, verify) -> str:
        rollout, keep = record.rollout, record.keep
        rows = ["| prompt | response (**kept tokens**) | answer | correct |", "|---|---|---|---|"]
        for i in range(min(self.num_rows, rollout.response_mask.shape[0])):
            length = int(rollout.response_mask[i].sum())
            ids = rollout.response_ids[i, :length].tolist()
            prompt = tokenizer.decode(rollout.input_ids[i, : rollout.prompt_len].tolist(), skip_special_tokens=True)
            response = tokenizer.decode(ids, skip_special_tokens=True)
            answer = rollout.answers[i] if i < len(rollout.answers) else ""
            rows.append(f"| {prompt[-200:]!s} | {render_row(tokenizer, ids, keep[i, :length].tolist())} | {answer} | "
                        f"{'yes' if verify(response, answer) else 'no'} |")
        return "\n".join(rows)
