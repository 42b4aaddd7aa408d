"""Teacher placements: where the teacher runs, and what a training step gets from it per response position.

Public API (docs/api.md): the names in `__all__`, importable from `opdlab.teachers`. Built-ins: `local` (a model
in every training process, exact; the default) and `vllm_server` (a vLLM server's OpenAI-compatible API).
Plugins add placements through the entry-point group `opdlab.teacher_placements`.
"""

from opdlab.teachers.base import PendingTeacher, TeacherError, TeacherLoadOptions, TeacherPlacement, has_scheme, is_url
from opdlab.teachers.local import LocalTeacher
from opdlab.teachers.rows import DenseRows, ExactRows, HeadRows, SparseRows, TeacherRows, TopLogprobs
from opdlab.teachers.signal import TeacherNeedError, TeacherSignal, check_teacher_needs
from opdlab.teachers.vllm_server import TeacherServerError, VLLMServerTeacher

__all__ = [
    "DenseRows", "ExactRows", "HeadRows", "LocalTeacher", "PendingTeacher", "SparseRows", "TeacherError",
    "TeacherLoadOptions", "TeacherNeedError", "TeacherPlacement", "TeacherRows", "TeacherServerError", "TeacherSignal",
    "TopLogprobs", "VLLMServerTeacher", "check_teacher_needs", "has_scheme", "is_url",
]

# Moved after 0.2.0 (discovery sits above the placements it discovers); the old path warns and works for one release.
from opdlab._deprecation import moved_names  # noqa: E402

__getattr__ = moved_names(__name__, {"default_placement": "opdlab.plugins:default_placement"})
