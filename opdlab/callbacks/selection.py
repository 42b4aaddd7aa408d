"""Per-step selection and rollout metrics: how much of each rollout got supervised."""

from __future__ import annotations

import lightning as L

from opdlab.callbacks.histograms import step_record


class SelectionMetrics(L.Callback):
    """Logs, every training step:

    - `train/retained_ratio`: kept / valid response tokens;
    - `train/kept_tokens`, `train/valid_tokens`: the counts behind it;
    - `train/responses_with_kept`: fraction of non-empty responses with at least one kept token;
    - `rollout/len_mean`, `rollout/len_max`: response lengths in tokens (EOS included).
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        record = step_record(outputs)
        if record is None:
            return
        valid, keep = record.stats.valid, record.keep
        lengths = valid.sum(1).float()
        non_empty = lengths > 0
        n_valid = valid.sum().clamp_min(1)
        with_kept = (keep.any(1) & non_empty).sum() / non_empty.sum().clamp_min(1)
        pl_module.log_dict(
            {
                "train/retained_ratio": keep.sum() / n_valid,
                "train/kept_tokens": keep.sum().float(),
                "train/valid_tokens": valid.sum().float(),
                "train/responses_with_kept": with_kept.float(),
                "rollout/len_mean": lengths.mean(),
                "rollout/len_max": lengths.max(),
            },
            batch_size=valid.shape[0],
        )
