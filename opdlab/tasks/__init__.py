"""Verifiable tasks: prompt sources with held-out evaluation problems and an answer checker."""

from opdlab.tasks.addition import AdditionTask
from opdlab.tasks.base import Problem, PromptSource
from opdlab.tasks.datasets_source import DatasetPrompts
from opdlab.tasks.jsonl import JsonlPrompts
from opdlab.tasks.scratchpad import ScratchpadAdditionTask
from opdlab.tasks.spelled_addition import SpelledAdditionTask

__all__ = ["AdditionTask", "DatasetPrompts", "JsonlPrompts", "Problem", "PromptSource", "ScratchpadAdditionTask", "SpelledAdditionTask"]
