"""What a teacher placement gives per response position, what selectors and losses need, and the check
between the two (before anything loads).

Needs, from least to most: "none" (no teacher information: random or entropy selection), "token" (the
teacher's log-prob of the sampled token: the sampled-token loss), "topk" (its top-K candidates and their
probabilities: the C/D features, the tail-bucket forward KL), "full" (its whole distribution: full-vocabulary
KLs, entropies and divergences). A local teacher, and a server that sends the whole vocabulary, give "full";
a server that sends its top-k log-probs gives "topk" (docs/method.md §2.6).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from opdlab.console import OpdlabError

TeacherNeed = Literal["none", "token", "topk", "full"]
NEEDS: tuple[str, ...] = ("none", "token", "topk", "full")


class TeacherNeedError(OpdlabError, ValueError):
    """A selector or divergence needs more of the teacher than its placement gives."""


@dataclass(frozen=True)
class TeacherSignal:
    """What a placement gives: the whole distribution (`top_logprobs` None) or the top-k log-probs (and the
    sampled token's) per position."""

    top_logprobs: int | None = None

    @property
    def level(self) -> str:
        return "full" if self.top_logprobs is None else "topk"

    def describe(self) -> str:
        if self.top_logprobs is None:
            return "the teacher's whole distribution (every statistic and loss exact)"
        return (f"the teacher's top-{self.top_logprobs} log-probs per position: exact teacher log-prob of the sampled "
                "token (the sampled-token loss) and student features; C as a lower bound (its upper bound in "
                "compatibility_upper); D with unseen tokens sharing the tail mass; forward KL with a tail bucket; "
                "nothing over the full vocabulary")


def need_of(component) -> str:
    """A selector's or divergence's declared `teacher_needs` (checked to be one of NEEDS)."""
    need = getattr(component, "teacher_needs", "full")
    if need not in NEEDS:
        raise TeacherNeedError(f"{type(component).__name__}.teacher_needs is {need!r}; expected one of {', '.join(NEEDS)}")
    return need


def check_teacher_needs(signal: TeacherSignal, placement: str, *, suggest: Callable[[str], str] | None = None,
                        **components) -> None:
    """Refuse, in one line, a component (`selector=...`, `divergence=...`) that needs more than `signal`; a
    selector that needs the teacher's top-K lists also needs k >= its K. `suggest(role)` names the components of
    that role that would do (the module passes `opdlab.plugins.alternatives`)."""
    for role, component in components.items():
        need = need_of(component)
        name = type(component).__name__
        if NEEDS.index(need) > NEEDS.index(signal.level):
            raise TeacherNeedError(
                f"the {role} {name} needs the teacher's whole distribution, and the {placement} teacher placement "
                f"sends its top-{signal.top_logprobs} log-probs per position; use a {role} that needs less "
                f"({suggest(role) if suggest else 'see `opdlab plugins`'}), or serve the whole vocabulary (vLLM: --max-logprobs -1, and "
                "--model.teacher_placement.top_logprobs full), or use a local teacher")
        k = getattr(component, "top_k", None)
        if (signal.top_logprobs is not None and getattr(component, "needs_topk_lists", False) and k
                and k > signal.top_logprobs):
            raise TeacherNeedError(
                f"the {role} {name} reads the teacher's top-{k} lists, and the {placement} teacher placement sends "
                f"{signal.top_logprobs} log-probs per position; set --model.teacher_placement.top_logprobs {k} or more")
