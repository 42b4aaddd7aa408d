"""Bounded-staleness asynchronous rollouts: `RolloutPipeline` and its producers (docs/runs.md, docs/method.md §6)."""

from opdlab.pipeline.options import PipelineOptions
from opdlab.pipeline.pipeline import RolloutPipeline, Taken
from opdlab.pipeline.producers import (
    InlineProducer,
    Job,
    PipelineError,
    Produced,
    ProducerContext,
    RolloutProducer,
)


def make_producer(options: PipelineOptions) -> RolloutProducer:
    """The producer `options.producer` names."""
    if options.producer == "inline":
        return InlineProducer()
    if options.producer == "process":
        from opdlab.pipeline.process import ProcessProducer

        return ProcessProducer(options.producer_threads, options.producer_device, options.timeout)
    from opdlab.pipeline.fleet import FleetProducer

    return FleetProducer(options.urls, options.timeout)


# Public: the options (what `--model.pipeline.*` sets) and the error a failed pipeline raises. The producers and the
# schedule are internal for now (no plugin group chooses a producer yet).
__all__ = ["PipelineError", "PipelineOptions"]
