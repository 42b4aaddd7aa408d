"""Prompts read with Hugging Face `datasets`: local parquet, JSON/JSONL, CSV and arrow files, folders of them,
folders written by `Dataset.save_to_disk`, and hub ids where the network allows (`pip install -e ".[data]"`).

The prompt and answer are chosen by field name. A dotted name reaches into a nested record
(`reward_model.ground_truth`); a prompt stored as chat messages (`[{"role": "user", "content": ...}]`) gives
its last user turn. By default the first field present among `PROMPT_FIELDS` / `ANSWER_FIELDS` is used, so
DAPO-Math-17k (`prompt` messages, `reward_model.ground_truth`), MATH-500 (`problem`, `answer`), AIME 2024
(`Problem`, `Answer`), AIME 2025 (`question`, `answer`) and AMC (`problem`, numeric `answer`) read as they are.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from opdlab.tasks.base import Problem
from opdlab.tasks.jsonl import FileSplits, answer_text, shuffled_passes, warn_overlap

PROMPT_FIELDS = ("prompt", "problem", "question", "Problem", "Question")
ANSWER_FIELDS = ("answer", "reward_model.ground_truth", "Answer", "ground_truth", "final_answer")
FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


def import_datasets():
    try:
        import datasets
    except ImportError as err:
        raise ImportError('prompts from `datasets` need the datasets package: pip install -e ".[data]" '
                          "(or pip install datasets)") from err
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets


def load_records(path: str, split: str = "train", streaming: bool = False):
    """A `datasets.Dataset` (or `IterableDataset` when streaming) of the records at `path`: a file, a folder of
    files or one written by `save_to_disk`, or a hub dataset id."""
    local = Path(path).expanduser()
    if local.is_file():
        suffix = "".join(s for s in local.suffixes[-1:]).lower()
        if suffix not in FORMATS:
            raise ValueError(f"{path}: cannot tell the file's format from {suffix or 'no suffix'!r}; "
                             f"expected one of {', '.join(sorted(FORMATS))}")
        if FORMATS[suffix] in ("json", "csv") and not local.read_bytes().strip():
            raise ValueError(f"{path} holds no records (the file is empty)")
        datasets = import_datasets()
        try:
            return datasets.load_dataset(FORMATS[suffix], data_files=str(local), split="train", streaming=streaming)
        except Exception as err:  # noqa: BLE001 - pyarrow's and datasets' many parse errors: one line with the file
            raise ValueError(f"{path}: could not be read as {FORMATS[suffix]} ({type(err).__name__}: "
                             f"{' '.join(str(err).split())[:200]})") from None
    if local.is_dir():
        datasets = import_datasets()
        if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"{path} has no split {split!r}; it has {sorted(loaded)} (set the split option)")
                loaded = loaded[split]
            return loaded.to_iterable_dataset() if streaming else loaded
        if not any(p.suffix.lower() in FORMATS for p in local.rglob("*") if p.is_file()):
            raise ValueError(f"{path} is a folder without data files (expected {', '.join(sorted(FORMATS))} files, "
                             "or a folder written by Dataset.save_to_disk)")
        try:
            return datasets.load_dataset(str(local), split=split, streaming=streaming)
        except ValueError as err:  # e.g. 'Unknown split "test". Should be one of ['train'].'
            raise ValueError(f"{path}: {' '.join(str(err).split())}") from None
    if path.count("/") != 1 or path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"dataset not found: {path} is neither a file, a folder nor a hub id (owner/name)")
    datasets = import_datasets()
    if os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "").strip() not in ("", "0"):
        raise FileNotFoundError(f"dataset {path!r} is not a local file or folder and the hub is off (HF_HUB_OFFLINE "
                                "or HF_DATASETS_OFFLINE is set); download it elsewhere and pass its local path")
    try:
        return datasets.load_dataset(path, split=split, streaming=streaming)
    except Exception as err:  # noqa: BLE001 - the hub's and the network's many error types: one line
        raise ValueError(f"could not load dataset {path!r} (split {split!r}) from the hub: {type(err).__name__}: "
                         f"{' '.join(str(err).split())[:300]}; pass a local file or folder instead") from None


def field_value(record: dict, name: str):
    """`record[name]`, following dots into nested records; KeyError when a part is missing."""
    value = record
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(name)
        value = value[part]
    return value


def choose_field(columns: dict, given: str | None, candidates: tuple[str, ...], what: str, path: str) -> str:
    """The field to read `what` from: `given`, or the first of `candidates` the records have."""
    names = [given] if given else list(candidates)
    for name in names:
        try:
            field_value(columns, name)
            return name
        except KeyError:
            continue
    available = ", ".join(flat_names(columns)) or "none"
    if given:
        raise ValueError(f"{path}: no field {given!r} for the {what}; the records have: {available}")
    raise ValueError(f"{path}: none of the usual {what} fields ({', '.join(candidates)}) is in the records; they "
                     f"have: {available}; name it with the {what}_field option")


def flat_names(record: dict, prefix: str = "") -> list[str]:
    names = []
    for key, value in record.items():
        names.append(prefix + key)
        if isinstance(value, dict):
            names += flat_names(value, prefix + key + ".")
    return names


def prompt_text(value) -> str | None:
    """A prompt as text: a string, or the last user turn of chat messages."""
    if isinstance(value, list):
        users = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
        value = users[-1] if users else None
    return value if isinstance(value, str) else None


def iter_problems(records, path: str, prompt_field: str | None = None, answer_field: str | None = None,
                  require_answers: bool = True) -> Iterator[Problem]:
    """Problems from `datasets` records; the fields are chosen on the first record. A record without a usable
    prompt or answer raises with its row number (an answer-less record gets '' when `require_answers` is off)."""
    fields = None
    for row, record in enumerate(records):
        where = f"{path} row {row}"
        if fields is None:
            fields = (choose_field(record, prompt_field, PROMPT_FIELDS, "prompt", path),
                      choose_field(record, answer_field, ANSWER_FIELDS, "answer", path) if require_answers
                      else answer_field)
        prompt = prompt_text(field_value(record, fields[0]))
        if prompt is None or not prompt.strip():
            raise ValueError(f"{where}: field {fields[0]!r} holds no prompt text (got {str(record.get(fields[0]))[:60]!r})")
        try:
            answer = field_value(record, fields[1]) if fields[1] else None
        except KeyError:
            answer = None
        if answer is None and not require_answers:
            answer = ""
        yield Problem(prompt=prompt, answer=answer_text(answer, f"{where} (field {fields[1]!r})"))


def read_problems(path: str, split: str = "train", prompt_field: str | None = None, answer_field: str | None = None,
                  limit: int | None = None) -> list[Problem]:
    """Every problem at `path` (the first `limit` ones when set); an empty set is refused."""
    records = load_records(path, split)
    if limit is not None:
        records = records.select(range(min(limit, len(records))))
    problems = list(iter_problems(records, path, prompt_field, answer_field))
    if not problems:
        raise ValueError(f"{path} (split {split!r}) holds no records")
    return problems


class DatasetPrompts(FileSplits):
    """Prompts and answers read with `datasets` (local parquet/JSON/JSONL/CSV/arrow files or folders, a hub id
    where the network allows).

    Args:
        path: training prompts: a file, a folder, or a hub dataset id (owner/name).
        split: the split of `path` to read (single files have only "train").
        prompt_field: the field holding the prompt (dots reach into nested records; chat messages give their
            last user turn). Default: the first of prompt, problem, question, Problem, Question.
        answer_field: the field holding the reference answer. Default: the first of answer,
            reward_model.ground_truth (DAPO-Math-17k), Answer, ground_truth, final_answer.
        eval_path: held-out evaluation prompts (same forms and fields). If omitted, the last `num_eval` training
            records are held out (and removed from training).
        num_eval: how many records to hold out when `eval_path` is omitted.
        test_path: held-out test prompts for `opdlab test`.
        verifier: `exact` (stripped string equality) or `math` (math-verify, `pip install -e ".[math]"`).
        chat_template: apply the tokenizer's chat template to each prompt (for chat models).
        streaming: read the training records as a stream instead of loading them (for sets larger than memory);
            the order is then the file's, cycled, and a resumed run skips what it consumed. Needs eval_path.
        seed: shuffling seed (not streaming).
    """

    def __init__(
        self,
        path: str,
        split: str = "train",
        prompt_field: str | None = None,
        answer_field: str | None = None,
        eval_path: str | None = None,
        num_eval: int = 64,
        test_path: str | None = None,
        verifier: Literal["exact", "math"] = "exact",
        chat_template: bool = False,
        streaming: bool = False,
        seed: int = 0,
    ) -> None:
        if verifier not in ("exact", "math"):
            raise ValueError(f"verifier must be 'exact' or 'math', got {verifier!r}")
        if streaming and eval_path is None:
            raise ValueError("streaming=true needs eval_path: a stream cannot hold out its last records")
        self.path, self.split, self.streaming, self.seed = path, split, streaming, seed
        self.fields = (prompt_field, answer_field)
        self.verifier, self.use_chat_template = verifier, chat_template
        self._test = read_problems(test_path, "train", *self.fields) if test_path is not None else None
        if streaming:
            self._records = load_records(path, split, streaming=True)
            self._train = None
            self._eval = read_problems(eval_path, "train", *self.fields)
            first = next(iter(iter_problems(self._records.take(1), path, *self.fields)), None)
            if first is None:
                raise ValueError(f"{path} (split {split!r}) holds no records")
            return
        self._train = read_problems(path, split, *self.fields)
        if eval_path is not None:
            self._eval = read_problems(eval_path, "train", *self.fields)
        else:
            if len(self._train) <= num_eval:
                raise ValueError(f"{path} has {len(self._train)} problems, too few to hold out num_eval={num_eval}; "
                                 "pass eval_path or lower num_eval")
            self._train, self._eval = self._train[:-num_eval], self._train[-num_eval:]
        warn_overlap(self._train, self._eval, "evaluation")
        if self._test is not None:
            warn_overlap(self._train, self._test, "test")

    def train_problems(self, start: int = 0) -> Iterator[Problem]:
        if self.streaming:
            yield from self._stream(start)
            return
        yield from shuffled_passes(self._train, self.seed, start)

    def _stream(self, start: int) -> Iterator[Problem]:
        """The records in file order, cycled; the first `start` are skipped (read, not yielded)."""
        index = 0
        while True:
            seen = 0
            for problem in iter_problems(self._records, self.path, *self.fields):
                seen += 1
                if index >= start:
                    yield problem
                index += 1
            if seen == 0:
                raise ValueError(f"{self.path} (split {self.split!r}) holds no records")
            if index < start:  # skip whole passes at once
                index += (start - index) // seen * seen
