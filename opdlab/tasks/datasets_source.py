"""Prompts read with Hugging Face `datasets`: local parquet, JSON/JSONL, CSV/TSV and arrow files, globs and folders
of them (one format at a time), folders written by `Dataset.save_to_disk`, and hub ids where the network allows
(`pip install -e ".[data]"`). CSV/TSV cells are read as text, never as inferred numbers: an answer "021" stays
"021". A file whose bytes disagree with its name, an empty file and a mixed folder are refused in one line.

The prompt and answer are chosen by field name. A dotted name reaches into a nested record
(`reward_model.ground_truth`); a prompt stored as chat messages (`[{"role": "user", "content": ...}]`) gives
its last user turn. By default the first field present among `PROMPT_FIELDS` / `ANSWER_FIELDS` is used, so
DAPO-Math-17k (`prompt` messages, `reward_model.ground_truth`), MATH-500 (`problem`, `answer`), AIME 2024
(`Problem`, `Answer`), AIME 2025 (`question`, `answer`) and AMC (`problem`, numeric `answer`) read as they are.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from opdlab.console import error_summary
from opdlab.tasks.base import DataError, Problem
from opdlab.tasks.jsonl import (MAGIC, FileSplits, answer_text, check_num_eval, hold_out, shuffled_passes,
                                 warn_overlap)

PROMPT_FIELDS = ("prompt", "problem", "question", "Problem", "Question")
ANSWER_FIELDS = ("answer", "reward_model.ground_truth", "Answer", "ground_truth", "final_answer")
# A file's format from its (last) suffix; .tsv is CSV with tabs. Folders and globs must hold one format.
FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".ndjson": "json", ".csv": "csv", ".tsv": "csv",
           ".arrow": "arrow"}
GLOB_CHARS = "*?["


def import_datasets():
    try:
        import datasets
    except ImportError as err:
        raise ImportError('prompts from `datasets` need the datasets package: pip install -e ".[data]" '
                          "(or pip install datasets)") from err
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets


def one_line(err: BaseException, limit: int = 200) -> str:
    """`Type: message` of an error on one line; datasets' "An error occurred while generating the dataset" is
    replaced by the error that caused it (which says what is wrong with the file)."""
    while type(err).__name__ == "DatasetGenerationError" and err.__cause__ is not None:
        err = err.__cause__
    return error_summary(err, limit)


def file_kind(path: Path) -> str:
    """The format of a data file (`parquet`, `json`, `csv`, `arrow`) from its suffix; anything else is refused."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"{path}: cannot tell the file's format from {suffix or 'no suffix'!r}; expected one of "
                        f"{', '.join(sorted(FORMATS))} (rename it, e.g. to .parquet or .jsonl)")
    return FORMATS[suffix]


def check_file(path: Path) -> str:
    """The file's format, once its bytes agree with its name: an empty file, a parquet file without parquet's
    magic number, a text file named .arrow, a binary or compressed file named .json/.jsonl/.csv are refused
    (each with what it is and what to do); a parquet file without rows is refused as such."""
    kind = file_kind(path)
    with path.open("rb") as f:
        head = f.read(8)
    found = next((name for magic, name in MAGIC if head.startswith(magic)), None)
    if not head.strip():
        raise DataError(f"{path}: no rows (the file is empty)")
    if found in ("gzip", "zip"):
        raise DataError(f"{path} is {found}-compressed, not {kind}; decompress it first and pass the file inside")
    if kind == "parquet" and found != "parquet":
        raise DataError(f"{path} is not a parquet file (parquet files start with PAR1; this one starts with "
                        f"{head[:4]!r}{', an arrow file' if found == 'arrow' else ''}); rename it to the format it is "
                        "(.jsonl, .csv, .arrow) or write it again as parquet")
    text = all(32 <= b < 127 or b in (9, 10, 13) for b in head)  # printable ASCII: JSON, CSV, a note
    if kind == "arrow" and (found not in ("arrow", None) or text):
        raise DataError(f"{path} is not an arrow file ({found or 'it starts with text ' + repr(head[:4])}); rename it to "
                        "the format it is")
    if kind in ("json", "csv") and found in ("parquet", "arrow"):
        raise DataError(f"{path} is a {found} file, not {path.suffix.lower()[1:].upper()} text; rename it to "
                        f".{found} (its format is read from its name)")
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as err:  # noqa: BLE001 - a truncated or corrupt file: one line with the file
            raise DataError(f"{path}: could not be read as parquet ({one_line(err)})") from None
        if rows == 0:
            raise DataError(f"{path}: no rows (the parquet file holds a schema and no records)")
    return kind


def builder_options(kind: str, files: list[Path]) -> dict:
    """Extra `load_dataset` options of a format. CSV/TSV: every column is read as text (no type inference:
    an answer "021" stays "021", "NA" stays "NA"); what each cell means is for the verifier to decide."""
    if kind != "csv":
        return {}
    import pandas as pd

    datasets = import_datasets()
    sep = "\t" if files[0].suffix.lower() == ".tsv" else ","
    try:
        columns = pd.read_csv(files[0], sep=sep, nrows=0).columns
    except Exception as err:  # noqa: BLE001 - pandas' parse errors: one line with the file
        raise DataError(f"{files[0]}: could not read the CSV header ({one_line(err)})") from None
    return {"features": datasets.Features({name: datasets.Value("string") for name in columns}), "na_filter": False,
            "sep": sep}


def group_files(files: list[Path]) -> dict[str, list[Path]]:
    """Data files by suffix family (parquet, json/jsonl, csv, tsv, arrow)."""
    groups: dict[str, list[Path]] = {}
    for f in files:
        suffix = f.suffix.lower()
        family = "json/jsonl" if FORMATS.get(suffix) == "json" else suffix[1:]
        groups.setdefault(family, []).append(f)
    return groups


def refuse_mixed(where: str, groups: dict[str, list[Path]], example: str) -> None:
    if len(groups) > 1:
        counts = ", ".join(f"{len(fs)} {family} file{'s' if len(fs) > 1 else ''}" for family, fs in sorted(groups.items()))
        raise DataError(f"{where} mixes data formats ({counts}); `datasets` would read one format and silently drop "
                        f"the rest: keep one format there, or pass one file or a glob of one format (e.g. {example})")


def single_split(path: str, split: str) -> None:
    if split != "train":
        raise DataError(f"{path} is one file (or a glob of files), which has only the 'train' split, but split={split!r} "
                        "was asked: point the path at the file holding that split, or at a folder with train/test files; "
                        "for training, hold records out with num_eval or pass eval_path / test_path")


def load_files(path: str, files: list[Path], split: str, streaming: bool):
    """The records of one or more files of one format."""
    single_split(path, split)
    groups = group_files(files)
    refuse_mixed(path, groups, f"{Path(path).parent}/*{max(groups.values(), key=len)[0].suffix}")
    kinds = {check_file(f) for f in files}
    (kind,) = kinds
    datasets = import_datasets()
    try:
        return datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", streaming=streaming,
                                     **builder_options(kind, files))
    except Exception as err:  # noqa: BLE001 - pyarrow's and datasets' many parse errors: one line with the file
        if "corresponds to no data" in str(err):  # datasets' word for a file of column names and no records
            raise DataError(f"{path}: no rows (the file holds column names and no records)") from None
        raise DataError(f"{path}: could not be read as {kind} ({one_line(err)})") from None


def folder_files(folder: Path) -> list[Path]:
    """The data files `datasets` would see in a folder (hidden files and folders skipped, as it does)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS
                  and not any(part.startswith((".", "__")) for part in p.relative_to(folder).parts))


def refuse_outnumbered(folder: Path, files: list[Path]) -> None:
    """`datasets` reads a folder with the builder of its most common data suffix (parquet wins a tie): other files it
    would read as data (.txt notes, .xml ...) that outnumber the data files would replace them. Refused up front."""
    try:
        from datasets.packaged_modules import _EXTENSION_TO_MODULE as known  # which suffixes datasets reads as data
    except ImportError:  # its private table moved: the common case only
        known = {".txt": None, ".xml": None}
    ours = Counter(f.suffix.lower() for f in files)
    others = Counter(p.suffix.lower() for p in folder.rglob("*") if p.is_file() and p.suffix.lower() not in FORMATS
                     and p.suffix in known and not any(part.startswith((".", "__")) for part in p.relative_to(folder).parts))
    if not others:
        return
    (suffix, count), (other, other_count) = ours.most_common(1)[0], others.most_common(1)[0]
    if other_count > count or other_count == count and suffix != ".parquet":
        raise DataError(f"{folder}: its {other_count} {other} file(s) outnumber its {count} {suffix} file(s), so "
                        f"`datasets` would read the {other} files as the data; move the data files into a folder of "
                        f"their own, or pass a glob (e.g. {folder}/*{suffix})")


def load_records(path: str, split: str = "train", streaming: bool = False):
    """A `datasets.Dataset` (or `IterableDataset` when streaming) of the records at `path`: a file, a glob of
    files, a folder of files or one written by `save_to_disk`, or a hub dataset id."""
    local = Path(path).expanduser()
    if local.is_file():
        return load_files(path, [local], split, streaming)
    if any(c in path for c in GLOB_CHARS) and not local.exists():
        import glob

        matched = sorted(Path(p) for p in glob.glob(str(local), recursive=True) if Path(p).is_file())
        if not matched:
            raise DataError(f"{path} matches no files; check the folder and the pattern (e.g. data/*.parquet)")
        return load_files(path, matched, split, streaming)
    if local.is_dir():
        datasets = import_datasets()
        if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{path} has no split {split!r}; it has {sorted(loaded)} (set the split option)")
                loaded = loaded[split]
            return loaded.to_iterable_dataset() if streaming else loaded
        files = folder_files(local)
        if not files:
            raise DataError(f"{path} is a folder without data files (expected {', '.join(sorted(FORMATS))} files, "
                            "or a folder written by Dataset.save_to_disk)")
        groups = group_files(files)
        refuse_mixed(path, groups, f"{path.rstrip('/')}/*{max(groups.values(), key=len)[0].suffix}")
        refuse_outnumbered(local, files)
        kinds = {check_file(f) for f in files}
        (kind,) = kinds
        try:
            loaded = datasets.load_dataset(str(local), split=split, streaming=streaming, **builder_options(kind, files))
        except ValueError as err:  # e.g. 'Unknown split "test". Should be one of ['train'].'
            raise DataError(f"{path}: {' '.join(str(err).split())}") from None
        except Exception as err:  # noqa: BLE001 - a file datasets cannot parse: one line with the folder
            raise DataError(f"{path}: could not be read as {kind} ({one_line(err)})") from None
        builder = getattr(loaded.info, "builder_name", None)
        if builder not in (None, kind):  # datasets picks the most common suffix: other files outnumbered the data
            raise DataError(f"{path}: `datasets` read the folder's other files as {builder} instead of its {len(files)} "
                            f"{kind} file(s); move the data files into a folder of their own, or pass a glob "
                            f"(e.g. {path.rstrip('/')}/*{files[0].suffix})")
        return loaded
    if local.suffix.lower() in FORMATS:  # a file name, not a hub id (owner/name): say so without asking the hub
        raise FileNotFoundError(f"prompt file not found: {path} (relative paths start from {os.getcwd()})")
    if path.count("/") != 1 or path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"dataset not found: {path} is neither a file, a folder nor a hub id (owner/name)")
    datasets = import_datasets()
    if os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "").strip() not in ("", "0"):
        raise FileNotFoundError(f"dataset {path!r} is not a local file or folder and the hub is off (HF_HUB_OFFLINE "
                                "or HF_DATASETS_OFFLINE is set); download it elsewhere and pass its local path")
    try:
        return datasets.load_dataset(path, split=split, streaming=streaming)
    except Exception as err:  # noqa: BLE001 - the hub's and the network's many error types: one line
        raise DataError(f"could not load dataset {path!r} (split {split!r}) from the hub: {one_line(err, 300)}; pass a "
                        "local file or folder instead") from None


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
        raise DataError(f"{path}: no field {given!r} for the {what}; the records have: {available}")
    raise DataError(f"{path}: none of the usual {what} fields ({', '.join(candidates)}) is in the records; they "
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
        value = field_value(record, fields[0])
        prompt = prompt_text(value)
        if prompt is None:
            raise DataError(f"{where}: field {fields[0]!r} holds {str(value)[:60]!r} (of type {type(value).__name__}), not "
                            "prompt text; name the field of the problem text with the prompt_field option")
        if not prompt.strip():
            raise DataError(f"{where}: field {fields[0]!r} is empty; every record needs the text of a problem")
        try:
            answer = field_value(record, fields[1]) if fields[1] else None
        except KeyError:
            answer = None
        if answer is None and not require_answers:
            answer = ""
        elif isinstance(answer, str) and not answer.strip():
            raise DataError(f"{where}: field {fields[1]!r} (the answer) is empty; held-out accuracy is measured against "
                            "it: fill it in or drop the record")
        yield Problem(prompt=prompt, answer=answer_text(answer, f"{where} (field {fields[1]!r})"))


def read_problems(path: str, split: str = "train", prompt_field: str | None = None, answer_field: str | None = None,
                  limit: int | None = None) -> list[Problem]:
    """Every problem at `path` (the first `limit` ones when set); an empty set is refused."""
    records = load_records(path, split)
    if limit is not None:
        records = records.select(range(min(limit, len(records))))
    problems = list(iter_problems(records, path, prompt_field, answer_field))
    if not problems:
        raise DataError(f"{path}: no rows (split {split!r} holds no records)")
    return problems


class DatasetPrompts(FileSplits):
    """Prompts and answers read with `datasets` (local parquet/JSON/JSONL/CSV/arrow files or folders, a hub id
    where the network allows).

    Args:
        path: training prompts: a file (.parquet, .jsonl/.json, .csv/.tsv, .arrow), a glob of files of one format
            (`data/*.parquet`), a folder of files of one format (or written by `save_to_disk`), or a hub dataset id
            (owner/name). CSV/TSV columns are read as text ("021" stays "021").
        split: the split of `path` to read: a folder's or a hub dataset's (e.g. test); a single file has only
            "train", and another split of it is refused (hold records out with num_eval, or pass eval_path).
        prompt_field: the field holding the prompt (dots reach into nested records; chat messages give their
            last user turn). Default: the first of prompt, problem, question, Problem, Question.
        answer_field: the field holding the reference answer. Default: the first of answer,
            reward_model.ground_truth (DAPO-Math-17k), Answer, ground_truth, final_answer.
        eval_path: held-out evaluation prompts (same forms and fields). If omitted, the last `num_eval` training
            records are held out (and removed from training).
        num_eval: how many records to hold out when `eval_path` is omitted (>= 1: validation needs some).
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
            raise DataError(f"verifier must be 'exact' or 'math', got {verifier!r}")
        if streaming and eval_path is None:
            raise DataError("streaming=true needs eval_path: a stream cannot hold out its last records")
        check_num_eval(num_eval, eval_path)
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
                raise DataError(f"{path}: no rows (split {split!r} holds no records)")
            return
        self._train = read_problems(path, split, *self.fields)
        if eval_path is not None:
            self._eval = read_problems(eval_path, "train", *self.fields)
        else:
            self._train, self._eval = hold_out(self._train, num_eval, path)
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
                raise DataError(f"{self.path}: no rows (split {self.split!r} holds no records)")
            if index < start:  # skip whole passes at once
                index += (start - index) // seen * seen
