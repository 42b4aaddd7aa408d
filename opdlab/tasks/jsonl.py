"""Prompts from JSONL files: one `{"prompt": ..., "answer": ...}` object per line (or DAPO-Math layout)."""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Literal

from opdlab.tasks.base import DataError, Problem, PromptSource

# What a file that is not JSONL is, from its first bytes (magic numbers) or, for text tables, its name.
MAGIC = ((b"PAR1", "parquet"), (b"ARROW1", "arrow"), (b"\xff\xff\xff\xff", "arrow"), (b"\x1f\x8b", "gzip"),
         (b"PK\x03\x04", "zip"))
TABLE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "CSV", ".tsv": "TSV"}


def sniff_format(path: Path) -> str | None:
    """'parquet', 'arrow', 'gzip' or 'zip' when the file's first bytes say so, else None (text, or unknown)."""
    with path.open("rb") as f:
        head = f.read(8)
    return next((name for magic, name in MAGIC if head.startswith(magic)), None)


def refuse_non_jsonl(path: Path, option: str) -> None:
    """A parquet, arrow, CSV/TSV or compressed file given as JSONL: say which reader takes it, with its option."""
    kind = sniff_format(path) or TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        return
    if kind in ("gzip", "zip"):
        raise DataError(f"{path} ({option}) is a {kind}-compressed file, not JSONL text; decompress it first "
                        f"({'gunzip' if kind == 'gzip' else 'unzip'}) and pass the .jsonl file")
    target = "path" if option == "train_path" else option
    raise DataError(f"{path} ({option}) is a {kind} file, not JSONL; JsonlPrompts reads JSONL only: read it with "
                    f"opdlab.tasks.DatasetPrompts: --data.source opdlab.tasks.DatasetPrompts "
                    f"--data.source.init_args.{target} {path}"
                    + (" (train_path becomes path; eval_path, test_path, num_eval, verifier, chat_template and seed "
                       "keep their names)" if option == "train_path" else " (and train_path becomes path)"))


def parse_record(record) -> tuple[str | None, object]:
    """(prompt, raw answer) of one JSONL record; prompt None when it has no usable prompt.

    Accepts `{"prompt": str, "answer": ...}` and the DAPO-Math-17k layout
    `{"prompt": [{"role": "user", "content": str}], "reward_model": {"ground_truth": ...}}`.
    """
    if not isinstance(record, dict):
        return None, None
    prompt = record.get("prompt")
    if isinstance(prompt, list):  # chat messages: the last user turn is the problem
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        prompt = users[-1] if users else None
    answer = record.get("answer")
    if answer is None and isinstance(record.get("reward_model"), dict):
        answer = record["reward_model"].get("ground_truth")
    return (prompt if isinstance(prompt, str) else None), answer


def answer_text(answer: object, where: str) -> str:
    """The reference answer as the text a response is compared with; refuses what could never match.

    Integers and integral floats become their integer text (`125`, not `125.0`), other floats their
    shortest repr; strings pass unchanged. A missing answer, a list, a dict or a boolean is refused with
    the record's file and line: stringified, they read as `['125']` and every response would score 0.
    """
    if isinstance(answer, str):
        return answer
    if isinstance(answer, int) and not isinstance(answer, bool):
        return str(answer)
    if isinstance(answer, float) and answer == answer and abs(answer) != float("inf"):
        return str(int(answer)) if answer.is_integer() else repr(answer)
    if isinstance(answer, Decimal):  # a parquet decimal column: its text as written ("1.50")
        return str(answer)
    if answer is None:
        raise DataError(f'{where}: record has no answer (an "answer" field, or DAPO\'s '
                         '"reward_model": {"ground_truth": ...}); held-out accuracy is measured against it')
    raise DataError(f"{where}: answer must be a string or a number, got {type(answer).__name__} {answer!r}; "
                     "write the one reference answer as a string")


def read_jsonl_problems(path: str | Path, option: str = "train_path") -> list[Problem]:
    """Read problems from a JSONL file; a malformed line raises with its file and line number. A parquet, arrow,
    CSV/TSV or compressed file is refused with the DatasetPrompts option that reads it (`option`: the
    JsonlPrompts option that named the file)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"JSONL prompt file {path} is a directory; pass the .jsonl file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"JSONL prompt file not found: {path}")
    refuse_non_jsonl(path, option)
    problems = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark is fine
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1}); "
                                 "re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg}); expected one object per line") from None
            prompt, answer = parse_record(record)
            if isinstance(prompt, str) and not prompt.strip():
                raise DataError(f'{where}: the "prompt" is empty; every line needs the text of a problem')
            if prompt is None:
                raise DataError(
                    f'{where}: expected an object with a string "prompt" field (or DAPO-style chat '
                    f'messages), got {line.strip()[:80]!r}'
                )
            problems.append(Problem(prompt=prompt, answer=answer_text(answer, where)))
    if not problems:
        raise DataError(f"{path}: no problems found; expected lines like {{\"prompt\": \"...\", \"answer\": \"...\"}}")
    return problems


class FileSplits(PromptSource):
    """Held-out splits read from files (`_eval`, `_test`) and a named verifier (`verifier`): what JsonlPrompts
    and DatasetPrompts share."""

    _eval: list[Problem]
    _test: list[Problem] | None
    verifier: str

    def eval_problems(self) -> list[Problem]:
        return list(self._eval)

    def test_problems(self) -> list[Problem] | None:
        return list(self._test) if self._test is not None else None

    def verify(self, response: str, answer: str) -> bool:
        return check_answer(self.verifier, response, answer)


class JsonlPrompts(FileSplits):
    """Prompts and answers from JSONL files.

    Args:
        train_path: training prompts, cycled forever in a seeded order reshuffled every pass.
        eval_path: held-out evaluation prompts. If omitted, the last `num_eval` training lines are held
            out (and removed from training).
        num_eval: how many lines to hold out when `eval_path` is omitted.
        test_path: held-out test prompts for `opdlab test` (none: `opdlab test` refuses to run).
        verifier: `exact` (stripped string equality) or `math` (math-verify, `pip install opdlab[math]`).
        chat_template: apply the tokenizer's chat template to each prompt (for chat models).
        seed: shuffling seed.
    """

    def __init__(
        self,
        train_path: str,
        eval_path: str | None = None,
        num_eval: int = 64,
        verifier: Literal["exact", "math"] = "exact",
        chat_template: bool = False,
        seed: int = 0,
        test_path: str | None = None,
    ) -> None:
        if verifier not in ("exact", "math"):
            raise DataError(f"verifier must be 'exact' or 'math', got {verifier!r}")
        check_num_eval(num_eval, eval_path)
        self._train = read_jsonl_problems(train_path, "train_path")
        self._test = read_jsonl_problems(test_path, "test_path") if test_path is not None else None
        if eval_path is not None:
            self._eval = read_jsonl_problems(eval_path, "eval_path")
        else:
            self._train, self._eval = hold_out(self._train, num_eval, train_path)
        self.verifier, self.use_chat_template, self.seed = verifier, chat_template, seed
        warn_overlap(self._train, self._eval, "evaluation")
        if self._test is not None:
            warn_overlap(self._train, self._test, "test")

    def train_problems(self, start: int = 0) -> Iterator[Problem]:
        return shuffled_passes(self._train, self.seed, start)


def check_num_eval(num_eval: int, eval_path: str | None) -> None:
    """num_eval: how many training records to hold out for validation; >= 1 unless an eval_path is given
    (validation needs held-out problems: 0 would leave it nothing, a negative count means nothing)."""
    if isinstance(num_eval, bool) or not isinstance(num_eval, int):
        raise DataError(f"num_eval must be a whole number of records to hold out, got {num_eval!r}")
    if num_eval < 0:
        raise DataError(f"num_eval={num_eval} is negative; it is how many of the last training records are held out "
                        "for validation: give a count >= 1 (e.g. 64), or pass eval_path")
    if num_eval == 0 and eval_path is None:
        raise DataError("num_eval=0 holds out no records, but validation needs held-out problems: give num_eval >= 1 "
                        "(the last records of the file), or pass eval_path (a file of held-out problems)")


def hold_out(problems: list[Problem], num_eval: int, path: str) -> tuple[list[Problem], list[Problem]]:
    """(training, held-out): the last `num_eval` problems are held out; at least one must stay for training."""
    if len(problems) <= num_eval:
        raise DataError(f"{path} has {len(problems)} problems, too few to hold out num_eval={num_eval}; "
                        "pass eval_path or lower num_eval")
    return problems[:-num_eval], problems[-num_eval:]


def shuffled_passes(problems: list[Problem], seed: int, start: int = 0) -> Iterator[Problem]:
    """`problems` forever, each pass in its own seeded order, from stream position `start` (index-addressable:
    a resumed run continues exactly where it stopped)."""
    n, index = len(problems), start
    while True:
        epoch, offset = divmod(index, n)
        order = list(range(n))
        random.Random(f"{seed}-{epoch}").shuffle(order)
        for i in order[offset:]:
            yield problems[i]
            index += 1


def check_answer(verifier: str, response: str, answer: str) -> bool:
    """`exact`: stripped string equality; `math`: math-verify's equivalence of the last answer in the response."""
    if verifier == "exact":
        return response.strip() == answer.strip()
    from opdlab.tasks.math_answers import verify_math_answer

    return verify_math_answer(response, answer)


def warn_overlap(train: list[Problem], held_out: list[Problem], name: str) -> None:
    """Warn when held-out prompts also appear among the training prompts: the held-out accuracy would then
    measure memorisation as well (duplicated files, or an eval file cut from the training file)."""
    seen = {p.prompt.strip() for p in train}
    shared = sum(p.prompt.strip() in seen for p in held_out)
    if shared:
        warnings.warn(f"{shared} of {len(held_out)} {name} prompts also appear among the {len(train)} training "
                      f"prompts: held-out accuracy on them is not held out; remove them from one of the files",
                      stacklevel=3)
