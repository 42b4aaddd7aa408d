"""Math answer checking with HF `math-verify` (optional dependency: `pip install opdlab[math]`)."""

from __future__ import annotations


def verify_math_answer(response: str, answer: str) -> bool:
    """True when the last answer in `response` is mathematically equal to `answer`."""
    try:
        from math_verify import parse, verify
    except ImportError as err:
        raise ImportError(
            "verifier='math' needs math-verify; install it with `pip install 'opdlab[math]'`"
        ) from err
    gold = parse(answer if "$" in answer or "\\boxed" in answer else f"${answer}$")
    pred = parse(response)
    return bool(gold) and bool(pred) and bool(verify(gold, pred))
