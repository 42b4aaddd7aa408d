"""The module's calls to its teacher placement, whatever the placement: requests and rows for a step (rows on the
student's device), greedy answers for the teacher's accuracy, and one line naming where the run was when the
placement failed.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

from opdlab.console import error_summary
from opdlab.rollout import PromptBatch, Rollout
from opdlab.teachers.base import PendingTeacher, TeacherError, TeacherPlacement
from opdlab.teachers.rows import TeacherRows, to_device


class TeacherSession:
    """`placement`'s calls during a run; `where()` says where the run is (`in training step 12 ...`)."""

    def __init__(self, placement: TeacherPlacement, where: Callable[[], str]) -> None:
        self.placement, self.where = placement, where

    def request(self, rollout: Rollout) -> PendingTeacher:
        with self.failures():
            return self.placement.request(rollout)

    def rows(self, pending: PendingTeacher, rows: slice, device: torch.device) -> TeacherRows:
        """A micro-batch's teacher rows on `device` (the student's; a plugin's rows elsewhere are moved there)."""
        with self.failures():
            return to_device(pending.rows(rows), device)

    def generate(self, prompts: PromptBatch, max_new_tokens: int, sync_ranks: bool) -> Rollout:
        with self.failures():
            return self.placement.generate(prompts, max_new_tokens, sync_ranks)

    @contextmanager
    def failures(self):
        """A placement that fails ends the run with one line naming where: its own `TeacherError`s as they are,
        anything else wrapped with the placement's name."""
        try:
            yield
        except TeacherError as err:
            raise type(err)(f"{err} {self.where()}") from None
        except Exception as err:  # noqa: BLE001 - a plugin placement raises its own types
            raise TeacherError(f"teacher placement {self.placement.name} failed {self.where()}: "
                               f"{error_summary(err)}") from err
