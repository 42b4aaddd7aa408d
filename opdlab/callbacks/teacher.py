"""`TeacherLifetime`, `PipelineLifetime`: the teacher placement and the rollout producer are closed (threads stopped, requests in flight cancelled) when a fit,
validation or test ends, fails or is interrupted. Lightning calls a module's `teardown` only on success and a
callback's `on_exception` on failure and Ctrl-C, so the module adds this callback itself (`configure_callbacks`).
"""

from __future__ import annotations

import lightning as L


class TeacherLifetime(L.Callback):
    def teardown(self, trainer, pl_module, stage: str) -> None:
        pl_module.placement.close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        pl_module.placement.close()


class PipelineLifetime(L.Callback):
    """The rollout pipeline's producer (a worker process, a server fleet's connections) is stopped with the run."""

    def teardown(self, trainer, pl_module, stage: str) -> None:
        close_pipeline(pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        close_pipeline(pl_module)


def close_pipeline(module) -> None:
    pipeline = getattr(module, "pipeline", None)
    if pipeline is not None:
        pipeline.close()
