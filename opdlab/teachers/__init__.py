"""Teacher placements: where the teacher runs, and what a training step gets from it per response position.

Public API (docs/api.md): the names in `__all__`, importable from `opdlab.teachers`. Built-ins: `local` (a model
in every training process, exact; the default) and `vllm_server` (a vLLM server's OpenAI-compatible API).
Plugins add placements through the entry-point group `opdlab.teacher_placements`.
"""

from opdlab.teachers.base import PendingTeacher, TeacherLoadOptions, TeacherPlacement, default_placement, is_url
from opdlab.teachers.local import LocalTeacher
from opdlab.teachers.rows import DenseRows, HeadRows, SparseRows, TeacherRows, TopLogprobs
from opdlab.teachers.signal import TeacherNeedError, TeacherSignal, check_teacher_needs
from opdlab.teachers.vllm_server import TeacherServerError, VLLMServerTeacher

__all__ = [
    "DenseRows", "HeadRows", "LocalTeacher", "PendingTeacher", "SparseRows", "TeacherLoadOptions", "TeacherNeedError",
    "TeacherPlacement", "TeacherRows", "TeacherServerError", "TeacherSignal", "TopLogprobs", "VLLMServerTeacher",
    "check_teacher_needs", "default_placement", "is_url",
]
