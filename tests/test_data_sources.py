"""Prompt files a user brings (issue 28): the JSONL reader names the reader for tables, `datasets` files keep
their text ("021" stays "021"), and files, folders, globs and options that cannot give problems are refused in
one line that names them; configs/own_models_cpu.yaml and configs/eval/own_models_cpu.yaml run as written."""

from __future__ import annotations

import gzip
import json
import warnings
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import CONFIG_DIR, run_opdlab

from opdlab.console import OpdlabError
from opdlab.data import lost_characters
from opdlab.tasks import DatasetPrompts, JsonlPrompts
from opdlab.tasks.datasets_source import load_records, read_problems

ROWS = {"prompt": [f"{a}+{a}=" for a in range(10)], "answer": [f"{2 * a:03d}" for a in range(10)]}  # "000", "002" ...


def write_parquet(path: Path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def write_csv(path: Path, columns: dict, sep: str = ",") -> str:
    names = list(columns)
    lines = [sep.join(names)] + [sep.join(str(v) for v in row) for row in zip(*columns.values(), strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def write_jsonl(path: Path, columns: dict) -> str:
    path.write_text("".join(json.dumps(dict(zip(columns, row, strict=True))) + "\n" for row in zip(*columns.values(), strict=True)))
    return str(path)


def pairs(problems) -> list[tuple[str, str]]:
    return [(p.prompt, p.answer) for p in problems]


# ------------------------------------------------------------------------------ JsonlPrompts given a table
@pytest.mark.parametrize("name, kind", [("p.parquet", "parquet"), ("p.jsonl", "parquet"), ("p.csv", "CSV"),
                                        ("p.tsv", "TSV"), ("p.arrow", "arrow")])
def test_jsonl_reader_names_the_datasets_reader_for_a_table(tmp_path, name, kind):
    path = tmp_path / name
    if kind == "parquet":  # p.jsonl: parquet bytes under a .jsonl name, told by its magic number
        write_parquet(path, ROWS)
    elif kind == "arrow":
        with pa.ipc.new_file(path, pa.table(ROWS).schema) as writer:
            writer.write_table(pa.table(ROWS))
    else:
        write_csv(path, ROWS, "\t" if kind == "TSV" else ",")
    with pytest.raises(OpdlabError, match=rf"is a {kind} file, not JSONL") as err:
        JsonlPrompts(str(path), num_eval=2)
    message = str(err.value)
    assert f"--data.source opdlab.tasks.DatasetPrompts --data.source.init_args.path {path}" in message
    assert "not UTF-8" not in message and "\n" not in message
    evals = write_jsonl(tmp_path / "t.jsonl", ROWS)
    with pytest.raises(OpdlabError, match=rf"\(eval_path\) is a {kind} file.*init_args.eval_path {path}"):
        JsonlPrompts(evals, eval_path=str(path))


def test_jsonl_reader_says_to_decompress_a_gzip_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(gzip.compress(b'{"prompt": "1+1=", "answer": "2"}\n'))
    with pytest.raises(OpdlabError, match="gzip-compressed file, not JSONL text; decompress it"):
        JsonlPrompts(str(path), num_eval=1)


def test_a_parquet_file_for_jsonl_is_one_line_through_the_command(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", ROWS)
    result = run_opdlab(["fit", "--config", str(CONFIG_DIR / "fast.yaml"), "--data.source", "opdlab.tasks.JsonlPrompts",
                         "--data.source.init_args.train_path", path, "--data.source.init_args.num_eval", "2"])
    message = str(result.code)
    assert message.startswith("opdlab: error: ") and "opdlab.tasks.DatasetPrompts" in message, message
    assert message.count("\n") == 1 and "Traceback" not in result.err


# ------------------------------------------------------------------------------ answers stay text
@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet", "jsonl"])
def test_leading_zeros_survive_every_format(tmp_path, fmt):
    rows = {"prompt": ["1+20=", "3+4=", "x="], "answer": ["021", "007", "NA"]}
    path = {"csv": lambda: write_csv(tmp_path / "p.csv", rows), "tsv": lambda: write_csv(tmp_path / "p.tsv", rows, "\t"),
            "parquet": lambda: write_parquet(tmp_path / "p.parquet", rows),
            "jsonl": lambda: write_jsonl(tmp_path / "p.jsonl", rows)}[fmt]()
    assert pairs(read_problems(path)) == [("1+20=", "021"), ("3+4=", "007"), ("x=", "NA")]
    source = DatasetPrompts(path, num_eval=1)
    assert pairs(source.eval_problems()) == [("x=", "NA")]
    assert sorted(p.answer for p in source._train) == ["007", "021"]


def test_csv_folders_globs_and_streams_read_text_too(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    write_csv(folder / "a.csv", {"prompt": ["1+20="], "answer": ["021"]})
    write_csv(folder / "b.csv", {"prompt": ["0+0="], "answer": ["000"]})
    assert sorted(pairs(read_problems(str(folder)))) == [("0+0=", "000"), ("1+20=", "021")]
    assert sorted(pairs(read_problems(str(folder / "*.csv")))) == [("0+0=", "000"), ("1+20=", "021")]
    assert sorted(r["answer"] for r in load_records(str(folder), streaming=True)) == ["000", "021"]


def test_numbers_stored_as_numbers_become_their_text(tmp_path):
    path = write_parquet(tmp_path / "n.parquet", {"prompt": ["a", "b", "c"], "answer": [21, 7, 3],
                                                  "f": [21.0, 0.5, 3.0],
                                                  "d": pa.array([Decimal("1.50"), Decimal("2.00"), Decimal("3")],
                                                                pa.decimal128(5, 2))})
    assert [p.answer for p in read_problems(path)] == ["21", "7", "3"]
    assert [p.answer for p in read_problems(path, answer_field="f")] == ["21", "0.5", "3"]
    assert [p.answer for p in read_problems(path, answer_field="d")] == ["1.50", "2.00", "3.00"]


# ------------------------------------------------------------------------------ what is refused, in one line
def refused(call, *args, **kwargs) -> str:
    with pytest.raises(OpdlabError) as err:
        call(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message and "An error occurred while generating" not in message, message
    return message


def test_empty_files_have_no_rows(tmp_path):
    empty = write_parquet(tmp_path / "e.parquet", {"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())})
    assert refused(read_problems, empty).startswith(f"{empty}: no rows")
    (tmp_path / "z.csv").write_text("")
    assert refused(read_problems, str(tmp_path / "z.csv")).startswith(f"{tmp_path / 'z.csv'}: no rows")
    (tmp_path / "h.csv").write_text("prompt,answer\n")
    assert refused(read_problems, str(tmp_path / "h.csv")).startswith(f"{tmp_path / 'h.csv'}: no rows")
    (tmp_path / "z.parquet").write_bytes(b"")
    assert "no rows" in refused(read_problems, str(tmp_path / "z.parquet"))


def test_a_file_that_is_not_the_format_its_name_says(tmp_path):
    fake = tmp_path / "p.parquet"
    write_csv(fake, ROWS)
    assert "is not a parquet file" in refused(read_problems, str(fake))
    real = write_parquet(tmp_path / "real.parquet", ROWS)
    named_csv = tmp_path / "p.csv"
    named_csv.write_bytes(Path(real).read_bytes())
    assert "is a parquet file, not CSV text; rename it to .parquet" in refused(read_problems, str(named_csv))
    text_arrow = tmp_path / "p.arrow"
    write_csv(text_arrow, ROWS)
    assert "is not an arrow file" in refused(read_problems, str(text_arrow))
    (tmp_path / "p.xlsx").write_bytes(b"PK\x03\x04")
    assert "cannot tell the file's format from '.xlsx'" in refused(read_problems, str(tmp_path / "p.xlsx"))
    truncated = tmp_path / "t.parquet"
    truncated.write_bytes(Path(real).read_bytes()[:40])
    assert "could not be read as parquet" in refused(read_problems, str(truncated))


def test_a_folder_mixing_formats_is_refused_with_what_it_holds(tmp_path):
    write_parquet(tmp_path / "a.parquet", ROWS)
    write_parquet(tmp_path / "b.parquet", ROWS)
    write_csv(tmp_path / "c.csv", ROWS)
    message = refused(read_problems, str(tmp_path))
    assert "mixes data formats (1 csv file, 2 parquet files)" in message and f"{tmp_path}/*.parquet" in message
    assert len(read_problems(str(tmp_path / "*.parquet"))) == 20  # a glob of one format reads
    assert "mixes data formats" in refused(read_problems, str(tmp_path / "*"))


def test_notes_that_outnumber_the_data_files_are_refused(tmp_path):
    write_csv(tmp_path / "a.csv", ROWS)
    for i in range(2):
        (tmp_path / f"note{i}.txt").write_text("not data\n")
    assert "its 2 .txt file(s) outnumber its 1 .csv file(s)" in refused(read_problems, str(tmp_path))
    (tmp_path / "README.md").write_text("# my data\n")
    (tmp_path / "note1.txt").unlink()
    (tmp_path / ".hidden.parquet").write_bytes(b"junk")  # hidden files are not data (datasets skips them too)
    write_csv(tmp_path / "b.csv", ROWS)
    assert len(read_problems(str(tmp_path))) == 20


def test_a_glob_matching_nothing(tmp_path):
    assert "matches no files" in refused(read_problems, str(tmp_path / "*.parquet"))


def test_a_split_of_a_single_file_is_refused_and_a_folder_split_is_read(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", ROWS)
    message = refused(DatasetPrompts, path, split="test", num_eval=2)
    assert "has only the 'train' split, but split='test' was asked" in message and "num_eval" in message
    folder = tmp_path / "splits"
    folder.mkdir()
    write_parquet(folder / "train.parquet", ROWS)
    write_parquet(folder / "test.parquet", {"prompt": ["9+9="], "answer": ["018"]})
    assert pairs(read_problems(str(folder), split="test")) == [("9+9=", "018")]
    assert "Unknown split" in refused(read_problems, str(folder), split="validation")


@pytest.mark.parametrize("source", ["jsonl", "datasets"])
def test_num_eval_must_hold_out_something(tmp_path, source):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    make = JsonlPrompts if source == "jsonl" else DatasetPrompts
    assert "num_eval=-250 is negative" in refused(make, path, num_eval=-250)
    assert "num_eval=0 holds out no records" in refused(make, path, num_eval=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the eval file is the training file here: the overlap warning
        assert len(make(path, num_eval=0, eval_path=path).eval_problems()) == 10  # nothing to hold out: fine
    assert "too few to hold out num_eval=10" in refused(make, path, num_eval=10)


def test_a_prompt_that_is_not_text_and_an_empty_answer(tmp_path):
    ints = write_parquet(tmp_path / "i.parquet", {"prompt": [1, 2], "answer": ["1", "2"]})
    assert "field 'prompt' holds '1' (of type int), not prompt text" in refused(read_problems, ints)
    blank = write_csv(tmp_path / "b.csv", {"prompt": ["1+1=", "2+2="], "answer": ["2", ""]})
    assert "row 1: field 'answer' (the answer) is empty" in refused(read_problems, blank)
    lists = write_parquet(tmp_path / "l.parquet", {"prompt": ["a"], "answer": [["1", "2"]]})
    assert "answer must be a string or a number, got list" in refused(read_problems, lists)


# ------------------------------------------------------------------------------ characters a tokenizer lacks
def test_lost_characters_names_what_the_tokenizer_cannot_read(char_tokenizer):
    assert lost_characters(char_tokenizer, ["12+3=", "45+6="]) is None
    assert lost_characters(char_tokenizer, ["12+3=", "Q: 45+6=\n"]) == (":Q", "Q: 45+6=\n")
    assert lost_characters(char_tokenizer, ["1=", "Q: 1="], sample=1) is None  # only the first `sample` texts


# ------------------------------------------------------------------------------ the own-models configs
def test_own_models_cpu_config_trains_on_local_models_with_parquet_and_csv(tmp_path, tiny_checkpoints):
    rows = {"problem": [f"{a % 10}{a // 10}+{a % 7}{a % 3}=" for a in range(24)], "answer": ["010"] * 24}
    for path in (write_parquet(tmp_path / "p.parquet", rows), write_csv(tmp_path / "p.csv", rows)):
        save_dir = tmp_path / f"runs_{Path(path).suffix[1:]}"
        result = run_opdlab(["fit", "--config", str(CONFIG_DIR / "own_models_cpu.yaml"),
                             "--model.student", tiny_checkpoints.student, "--model.teacher", tiny_checkpoints.teacher,
                             "--data.source.init_args.path", path, "--data.source.init_args.num_eval", "4",
                             "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                             "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.enable_progress_bar", "false"])
        assert result.code == 0, f"{path}: {result.code}\n{result.err[-2000:]}"
        summary = json.loads(next(save_dir.glob("own_models_cpu/version_0/summary.json")).read_text())
        assert summary, path
        assert next(save_dir.glob("own_models_cpu/version_0/student/config.json")).is_file()


def test_own_models_cpu_eval_config_parses_and_reads_a_csv(tmp_path, tiny_checkpoints):
    config = CONFIG_DIR / "eval" / "own_models_cpu.yaml"
    printed = run_opdlab(["eval", "--config", str(config), "--print_config"])
    assert printed.code == 0, printed.err[-2000:]
    csv = write_csv(tmp_path / "held.csv", {"prompt": ["12+34=", "50+50="], "answer": ["046", "001"]})
    out = tmp_path / "eval"
    result = run_opdlab(["eval", "--config", str(config), "--model", tiny_checkpoints.student, "--benchmarks",
                         json.dumps([{"name": "own", "path": csv, "verifier": "exact"}]), "--k", "1",
                         "--out_dir", str(out)])
    assert result.code == 0, str(result.code) + result.err[-2000:]
    answers = sorted(json.loads(line)["answer"] for line in (out / "responses.jsonl").read_text().splitlines())
    assert answers == ["001", "046"]
