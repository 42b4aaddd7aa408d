"""The benchmark sets as evaluated: their problems read and checked before any model loads (`load_benchmark`),
the verifier that scores a response (`Verifier`), the response length limit of each set (`response_limits`),
and the checks of the prompts against a tokenizer (`check_chat_template`, `warn_lost_characters`)."""

from __future__ import annotations

from dataclasses import dataclass

from opdlab.evaluation.options import Benchmark, EvalError, EvalOptions
from opdlab.tasks.base import Problem


class Verifier:
    """Checks a response against the reference answer and reads its answer key (for majority voting).
    A response the verifier cannot read is wrong and has no key; it never stops the evaluation."""

    def __init__(self, kind: str, task=None) -> None:
        self.kind, self.task = kind, task
        if kind == "math":
            try:
                import math_verify  # noqa: F401
            except ImportError as err:
                raise EvalError("verifier 'math' needs math-verify: pip install -e \".[math]\"") from err

    def check(self, response: str, answer: str) -> tuple[bool, str | None]:
        """(correct, answer key or None when no answer could be read)."""
        try:
            if self.task is not None:
                return bool(self.task.verify(response, answer)), self.task.answer_key(response)
            if self.kind == "exact":
                return response.strip() == answer.strip(), response.strip() or None
            from math_verify import parse

            from opdlab.tasks.math_answers import verify_math_answer

            parsed = parse(response)
            key = str(parsed[-1]) if parsed else None
            return (key is not None and verify_math_answer(response, answer)), key
        except Exception:  # noqa: BLE001 - an unreadable response is a wrong one, counted as unparsed
            return False, None


@dataclass
class LoadedBenchmark:
    """One set as evaluated: its spec, its problems (limit and prompt_template applied), the verifier that scores
    its responses and a toy task's own response length limit (None for other sets)."""

    spec: Benchmark
    problems: list[Problem]
    verifier: Verifier
    max_response_tokens: int | None


def load_benchmark(spec: Benchmark) -> LoadedBenchmark:
    """The problems of one set, read and checked before any model loads."""
    if spec.path.startswith("toy:"):
        from opdlab.toy import TOYS, make_task

        name, _, which = spec.path.removeprefix("toy:").partition(":")
        if name not in TOYS:
            raise EvalError(f"benchmark {spec.name!r}: unknown toy {name!r}; available: {', '.join(sorted(TOYS))}")
        if which not in ("", "test", "validation"):
            raise EvalError(f"benchmark {spec.name!r}: toy split must be test or validation, got {which!r}")
        task = make_task(TOYS[name], seed=0)
        problems = task.eval_problems() if which == "validation" else task.test_problems()
        verifier = Verifier(spec.verifier, task if spec.verifier == "auto" else None)
        limit_tokens = getattr(task, "max_response_tokens", len(problems[0].answer) + 2) if problems else None
    else:
        from opdlab.tasks.datasets_source import read_problems

        try:
            problems = read_problems(spec.path, spec.split, spec.prompt_field, spec.answer_field)
        except (ValueError, OSError, KeyError) as err:
            raise EvalError(f"benchmark {spec.name!r}: {err}") from None
        verifier = Verifier("math" if spec.verifier == "auto" else spec.verifier)
        limit_tokens = None
    if not problems:
        raise EvalError(f"benchmark {spec.name!r} ({spec.path}) holds no problems")
    problems = problems[: spec.limit] if spec.limit else problems
    if spec.prompt_template != "{prompt}":
        problems = [Problem(spec.prompt_template.replace("{prompt}", p.prompt), p.answer) for p in problems]
    return LoadedBenchmark(spec, problems, verifier, limit_tokens)


def response_limits(options: EvalOptions, loaded: list[LoadedBenchmark]) -> dict[str, int]:
    """max_new_tokens per benchmark: the option, or a toy task's own."""
    limits = {b.spec.name: options.max_new_tokens or b.max_response_tokens for b in loaded}
    missing = [name for name, n in limits.items() if n is None]
    if missing:
        raise EvalError(f"max_new_tokens is needed for {', '.join(missing)} (only toy tasks have their own); e.g. "
                        "--max_new_tokens 4096")
    return limits


def check_chat_template(tokenizer, label: str, prompt: str) -> None:
    """`--chat_template true` needs a tokenizer with a chat template that works: checked on the first prompt,
    before any weights load (a base model's tokenizer has none)."""
    if not getattr(tokenizer, "chat_template", None):
        raise EvalError(f"--chat_template true, but the tokenizer of {label} has no chat template (none in its "
                        "tokenizer_config.json or chat_template.jinja): it is a base model's; drop --chat_template "
                        "(or set chat_template: false in the eval config), or evaluate a chat model")
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    except Exception as err:  # noqa: BLE001 - a template is a program (Jinja): it fails in many ways
        raise EvalError(f"the chat template of {label} fails on the first prompt ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:160]}); fix the template, or drop --chat_template") from None


def warn_lost_characters(tokenizer, label: str, loaded: list) -> None:
    """Once per benchmark: prompts (with their prompt_template) holding characters the tokenizer cannot represent;
    the model cannot read them (fit and validate say the same of training data)."""
    import warnings

    from opdlab.data import lost_characters

    for bench in loaded:
        found = lost_characters(tokenizer, [p.prompt for p in bench.problems])
        if found:
            warnings.warn(f"benchmark {bench.spec.name!r}: the tokenizer of {label} cannot represent the characters "
                          f"{found[0][:20]!r} of prompts such as {found[1][:60]!r} (the data or its prompt_template): "
                          "the model cannot read them; check the data, the prompt_template or the tokenizer",
                          stacklevel=2)
