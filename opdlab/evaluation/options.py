"""What an evaluation is asked to do: its settings (`EvalOptions`), the sets it runs on (`Benchmark`), and the
error every bad evaluation input raises (`EvalError`). Shared by `opdlab eval`, `opdlab fit --eval.*` and
`opdlab compare --eval_config`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from opdlab.console import OpdlabError


class EvalError(OpdlabError, ValueError):
    """A bad evaluation input (options, benchmark files, a previous evaluation in the output folder)."""


@dataclass
class Benchmark:
    """One benchmark set.

    Args:
        name: its label in the tables and in responses.jsonl (e.g. math500, aime24).
        path: `toy:<name>` (a toy task's held-out test split; `toy:<name>:validation` for its validation split)
            or a file, folder or hub id read with `datasets` (parquet, JSON/JSONL, CSV, arrow).
        split: the split to read (single files have only "train").
        prompt_field: the field holding the problem (default: the first of prompt, problem, question, Problem).
        answer_field: the field holding the answer (default: the first of answer, reward_model.ground_truth,
            Answer, ground_truth, final_answer).
        verifier: `math` (math-verify: the last answer in the response, e.g. \\boxed{}, equals the reference),
            `exact` (stripped string equality), or `auto` (a toy task's own verifier; math otherwise).
        prompt_template: how each problem becomes a prompt; `{prompt}` is replaced by the problem, e.g.
            "{prompt}\\nPlease reason step by step, and put your final answer within \\\\boxed{}."
        limit: evaluate only the first this many problems (None: all).
    """

    name: str
    path: str
    split: str = "train"
    prompt_field: str | None = None
    answer_field: str | None = None
    verifier: Literal["auto", "math", "exact"] = "auto"
    prompt_template: str = "{prompt}"
    limit: int | None = None


@dataclass
class EvalOptions:
    """Sampled evaluation settings (shared by `opdlab eval` and `opdlab fit`'s evaluation after training).

    Args:
        benchmarks: the sets to evaluate on (see `Benchmark`); `opdlab fit` evaluates after training only when
            this is not empty.
        k: sampled responses per problem (Avg@k averages them; the paper uses 12-16).
        pass_at: the k' of pass@k' to report, each <= k (default: 1 and the powers of 2 up to k, and k).
        temperature: sampling temperature (0: greedy, then k must be 1).
        top_p: nucleus sampling threshold (1: none).
        max_new_tokens: response length limit (default: a toy task's own; required for other sets).
        max_prompt_len: longer prompts are cut from the left, with a warning.
        seeds: evaluation seeds; with several, every metric is reported as mean ± std over them.
        chat_template: wrap each prompt in the tokenizer's chat template (chat models).
        batch_size: problems per generation call (each sampled k times).
    """

    benchmarks: list[Benchmark] = field(default_factory=list)
    k: int = 8
    pass_at: list[int] | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int | None = None
    max_prompt_len: int = 2048
    seeds: list[int] = field(default_factory=lambda: [0])
    chat_template: bool = False
    batch_size: int = 32

    @classmethod
    def from_mapping(cls, data) -> EvalOptions:
        """The options of a YAML mapping or a jsonargparse Namespace, benchmarks given as mappings or Benchmarks
        (a TypeError names an unknown key)."""
        data = data.as_dict() if hasattr(data, "as_dict") else data
        if not isinstance(data, dict):
            kind = "a list" if isinstance(data, list) else f"a single value ({data!r})"
            raise EvalError(f"evaluation settings must be a mapping of options (k: 8, benchmarks: [...], ...), "
                            f"got {kind}")
        data = dict(data)
        benchmarks = data.get("benchmarks") or []
        if not isinstance(benchmarks, list):
            raise EvalError(f"benchmarks must be a list of {{name, path, ...}} entries, got a "
                            f"{type(benchmarks).__name__}")
        bad = [b for b in benchmarks if not isinstance(b, (dict, Benchmark)) and not hasattr(b, "as_dict")]
        if bad:
            raise EvalError(f"each benchmark must be a mapping {{name: ..., path: ...}}, got {bad[0]!r}")
        data["benchmarks"] = [b if isinstance(b, Benchmark) else
                              Benchmark(**dict(b.as_dict() if hasattr(b, "as_dict") else b)) for b in benchmarks]
        return cls(**data)

    def check(self) -> list[int]:
        """Refuse impossible settings; the pass@k' list to report."""
        if self.k < 1:
            raise EvalError(f"k (responses per problem) must be >= 1, got {self.k}")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise EvalError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.temperature == 0 and self.k > 1:
            raise EvalError(f"temperature 0 is greedy: its k={self.k} responses would be identical; use k=1, or a "
                            "temperature > 0 (e.g. 0.6)")
        if not 0 < self.top_p <= 1:
            raise EvalError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise EvalError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_prompt_len < 1 or self.batch_size < 1:
            raise EvalError(f"max_prompt_len and batch_size must be >= 1, got {self.max_prompt_len} and {self.batch_size}")
        if not self.seeds:
            raise EvalError("seeds is empty; give at least one evaluation seed, e.g. [0]")
        if len(set(self.seeds)) != len(self.seeds):
            raise EvalError(f"seeds repeat: {self.seeds}")
        names = [b.name for b in self.benchmarks]
        if len(set(names)) != len(names):
            raise EvalError(f"benchmark names repeat: {names}; give each set its own name")
        for b in self.benchmarks:
            if not isinstance(b.name, str) or not b.name.strip():
                raise EvalError(f"a benchmark has an empty name ({b.path}); give each set a name, e.g. math500")
            if not isinstance(b.path, str) or not b.path.strip():
                raise EvalError(f"benchmark {b.name!r}: path is empty; give a file, a folder, toy:<name> or a hub id")
            if b.path.startswith("toy:") and b.split != "train":
                raise EvalError(f"benchmark {b.name!r}: a toy set takes its split in the path ({b.path}:validation, "
                                f"or {b.path} for the test split), not split={b.split!r}; drop split")
            if b.limit is not None and b.limit < 1:
                raise EvalError(f"benchmark {b.name!r}: limit must be >= 1 or null, got {b.limit}")
            if "{prompt}" not in b.prompt_template:
                raise EvalError(f"benchmark {b.name!r}: prompt_template must contain {{prompt}}, got {b.prompt_template!r}")
        if self.pass_at is None:
            return sorted({1, self.k, *(2**i for i in range(1, 8) if 2**i <= self.k)})
        bad = [p for p in self.pass_at if not 1 <= p <= self.k]
        if bad:
            raise EvalError(f"pass_at {bad} outside [1, k={self.k}]: pass@k' needs k' of the k responses; raise k "
                            f"or drop them")
        return sorted(set(self.pass_at))
