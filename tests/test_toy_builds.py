"""Toy builds are atomic and safe under concurrency (issue 36, item 7).

A build of rank 1 under torch.distributed came out without weights: transformers' `save_pretrained` writes
config and weights on rank 0 only, and the folder was renamed into place anyway. These tests build for real
in two processes at once (under torch.distributed, and without a working file lock), damage a build and use
it, and leave an interrupted build behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from test_toy import TINY_TOY, leftovers

import opdlab.toy as toy
from opdlab.models import load_causal_lm, resolve_model_path
from opdlab.toy import ToyError, build_name, build_toy, file_manifest, toy_problem

TINY = f"tiny-v{TINY_TOY.version}-seed0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# One process of a two-process build: joins a gloo process group as RANK (so transformers sees rank 1 as
# a rank that is not 0), builds NAME into CACHE and prints what it sees in the finished folder as JSON.
BUILDER = """
import fcntl, json, os, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
import torch.distributed as dist
import opdlab.toy as toy
from opdlab.toy import ModelSpec, ToySpec
toy.TOYS["tiny"] = TINY_TOY
name, cache, rank = sys.argv[1], Path(sys.argv[2]), int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
if os.environ.get("NO_FLOCK"):  # a file system without working locks (some network file systems)
    def no_flock(*args):
        raise OSError(37, "No locks available")
    fcntl.flock = no_flock
elif rank == 0:  # rank 1 takes the build lock first: the order that lost the weights
    while not any(p.name.startswith(f"{name}-") or p.name.startswith(f".{name}-") and "-build-" in p.name
                  for p in cache.iterdir()):
        time.sleep(0.01)
path = toy.build_toy(name, cache_dir=cache, seed=0)
print(json.dumps({"path": str(path), "problem": toy.toy_problem(path, name, 0), "files": toy.file_manifest(path)}))
dist.destroy_process_group()
"""


def build_in_two_processes(name: str, cache: Path, timeout: float, **env) -> list[dict]:
    cache.mkdir(parents=True, exist_ok=True)
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", **env}
    code = BUILDER.replace("TINY_TOY", repr(TINY_TOY))  # without importing the tests' conftest (seconds)
    procs = [subprocess.Popen([sys.executable, "-c", code, name, str(cache)], cwd=REPO_ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**base, "RANK": str(rank)})
             for rank in (0, 1)]
    seen = []
    try:
        for proc in procs[::-1]:  # rank 1 first: it builds
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, err[-3000:]
            seen.insert(0, {**json.loads(out.strip().splitlines()[-1]), "log": out})
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return seen


def assert_same_intact_toy(seen: list[dict], name: str, cache: Path) -> None:
    assert seen[0]["path"] == seen[1]["path"] == str(cache / name)
    assert seen[0]["problem"] is None and seen[1]["problem"] is None
    assert seen[0]["files"] == seen[1]["files"]  # the same bytes, whichever rank built them
    for role in ("teacher", "student"):
        for file in (*toy.MODEL_FILES, *toy.TOKENIZER_FILES):
            assert f"{role}/{file}" in seen[0]["files"]
    assert leftovers(cache) == [name]  # no temporary folder left


@pytest.mark.parametrize("no_flock", [False, True], ids=["rank1-builds-rank0-waits", "no-file-lock-both-build"])
def test_two_ranks_building_at_once_end_with_the_same_intact_toy(tmp_path, no_flock):
    """Two processes of one torch.distributed job (gloo) build the same toy into an empty cache at once: with
    the file lock rank 1 builds while rank 0 waits; without one (flock unsupported) both build and the first
    rename wins. Either way both end with the same complete toy, weights and config included."""
    seen = build_in_two_processes("tiny", tmp_path, timeout=240, **({"NO_FLOCK": "1"} if no_flock else {}))
    assert_same_intact_toy(seen, TINY, tmp_path)
    built = [rank for rank in (0, 1) if "toy tiny: student reached" in seen[rank]["log"]]
    assert built == ([0, 1] if no_flock else [1])
    path = Path(seen[0]["path"])
    assert json.loads((path / "build.json").read_text())["files"] == seen[0]["files"]
    load_causal_lm(str(path / "student"))  # what failed with "should have a model_type key"


@pytest.mark.slow
def test_two_ranks_building_add2_at_once_end_with_the_same_intact_toy(tmp_path):
    """The reported case with the real add2 recipe (~1 min on 2 cores): two ranks, empty cache."""
    seen = build_in_two_processes("add2", tmp_path, timeout=900)
    assert_same_intact_toy(seen, build_name("add2", 0), tmp_path)
    assert ["toy add2: student reached" in s["log"] for s in seen] == [False, True]  # rank 1 built, rank 0 waited
    load_causal_lm(seen[0]["path"] + "/student")


def test_checkpoints_are_the_bytes_save_pretrained_writes(tmp_path):
    """`save_role` writes config and weights itself (on every rank); outside torch.distributed they are the
    files transformers' `save_pretrained` writes, so builds stay comparable with the shipped ones."""
    import torch

    tokenizer = toy.build_char_tokenizer()
    torch.manual_seed(0)
    model = toy.make_qwen2(TINY_TOY.student, tokenizer)
    toy.save_role(model, tokenizer, tmp_path / "ours")
    model.save_pretrained(tmp_path / "theirs")
    tokenizer.save_pretrained(tmp_path / "theirs")
    ours, theirs = file_manifest(tmp_path / "ours"), file_manifest(tmp_path / "theirs")
    assert ours == theirs and "model.safetensors" in ours and "config.json" in ours


# ------------------------------------------------------------------------------------------ damaged folders
@pytest.fixture
def tiny_build(tmp_path, monkeypatch):
    monkeypatch.setitem(toy.TOYS, "tiny", TINY_TOY)
    return build_toy("tiny", cache_dir=tmp_path, seed=0)


def count_trainings(monkeypatch) -> list[str]:
    real, trained = toy.train_supervised, []

    def counted(model, tokenizer, task, spec, toy_spec, desc):
        trained.append(desc)
        return real(model, tokenizer, task, spec, toy_spec, desc)

    monkeypatch.setattr(toy, "train_supervised", counted)
    return trained


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, says", [
    (lambda p: (p / "student" / "model.safetensors").unlink(), "student/model.safetensors is missing"),
    (lambda p: (p / "teacher" / "config.json").unlink(), "teacher/config.json is missing"),
    (lambda p: (p / "student" / "tokenizer.json").unlink(), "student/tokenizer.json is missing"),
    (lambda p: truncate(p / "teacher" / "model.safetensors"), "teacher/model.safetensors has"),
    (lambda p: flip_a_byte(p / "student" / "model.safetensors"), "student/model.safetensors does not match"),
    (lambda p: [(p / r / f).unlink() for r in ("teacher", "student") for f in ("config.json", "model.safetensors")],
     "student/config.json is missing"),  # the reported folder: tokenizer files only
], ids=["no-weights", "no-config", "no-tokenizer", "truncated", "changed-byte", "tokenizer-files-only"])
def test_a_damaged_cached_toy_is_rebuilt_when_used(tiny_build, monkeypatch, capsys, damage, says):
    before = file_manifest(tiny_build)
    damage(tiny_build)
    assert says in toy_problem(tiny_build, "tiny", 0)
    trained = count_trainings(monkeypatch)
    capsys.readouterr()
    assert build_toy("tiny", cache_dir=tiny_build.parent, seed=0) == tiny_build
    assert trained == ["toy tiny: teacher", "toy tiny: student"]
    line = [x for x in capsys.readouterr().out.splitlines() if "damaged" in x]
    assert line == [f"opdlab: toy folder {tiny_build} is damaged ({says}" + line[0].split(says, 1)[1]]
    assert line[0].endswith("; rebuilding it")
    assert toy_problem(tiny_build, "tiny", 0) is None
    assert set(file_manifest(tiny_build)) == set(before)
    assert leftovers(tiny_build.parent) == [tiny_build.name]


def test_a_damaged_build_from_an_older_opdlab_is_rebuilt(tiny_build, monkeypatch):
    """Cached builds from before the manifest (build.json without "files") are checked by their files."""
    report = json.loads((tiny_build / "build.json").read_text())
    del report["files"]
    (tiny_build / "build.json").write_text(json.dumps(report))
    assert toy_problem(tiny_build, "tiny", 0) is None  # intact: used as it is
    truncate(tiny_build / "student" / "model.safetensors")
    assert "student/model.safetensors is truncated" in toy_problem(tiny_build, "tiny", 0)
    (tiny_build / "teacher" / "model.safetensors").unlink()
    assert toy_problem(tiny_build, "tiny", 0) == "teacher/model.safetensors is missing"
    trained = count_trainings(monkeypatch)
    build_toy("tiny", cache_dir=tiny_build.parent, seed=0)
    assert len(trained) == 2 and toy_problem(tiny_build, "tiny", 0) is None


@pytest.mark.parametrize("damage, says", [
    (lambda p: (p / "build.json").unlink(), "build.json is missing"),
    (lambda p: truncate(p / "build.json"), "build.json is not valid JSON"),
], ids=["no-build-json", "truncated-build-json"])
def test_a_folder_opdlab_cannot_tell_it_built_is_refused_and_kept(tiny_build, monkeypatch, damage, says):
    damage(tiny_build)
    kept = file_manifest(tiny_build)
    monkeypatch.setattr(toy, "train_supervised", lambda *a, **k: pytest.fail("a folder not known as ours was replaced"))
    for force in (False, True):
        with pytest.raises(ToyError) as err:
            build_toy("tiny", cache_dir=tiny_build.parent, seed=0, force=force)
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith(f"toy folder {tiny_build} is not an intact opdlab build ({says})")
        assert "delete or move it" in message
    assert file_manifest(tiny_build) == kept  # nothing deleted


def test_a_damaged_toy_is_refused_through_model_paths_when_not_ours(tmp_path, monkeypatch):
    """`toy:` names check the cached folder before using it, and say in one line what to do."""
    monkeypatch.setenv("OPDLAB_CACHE", str(tmp_path))
    monkeypatch.setenv("OPDLAB_TOY_SEED", "7")  # no shipped build: the cache is used
    folder = tmp_path / "toy" / build_name("add2", 7)
    (folder / "student").mkdir(parents=True)
    (folder / "student" / "tokenizer.json").write_text("{}")
    refusal = f"toy folder {folder} is not an intact opdlab build (build.json is missing)"
    with pytest.raises(ToyError, match=re.escape(refusal)):
        resolve_model_path("toy:add2/student")
    assert (folder / "student" / "tokenizer.json").is_file()


@pytest.mark.parametrize("name", ["add3", "spell2", "scratch4", "mix4"])
def test_shipped_toys_pass_the_check_and_ship_their_manifest(name):
    import tomllib
    from fnmatch import fnmatch

    path = toy.SHIPPED / build_name(name, 0)
    assert toy_problem(path, name, 0) is None
    files = json.loads((path / "build.json").read_text())["files"]
    assert files == file_manifest(path)
    globs = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["opdlab"]
    for rel in ["build.json", *files]:  # every file the check needs is installed with the package
        assert any(fnmatch(f"toy_checkpoints/{path.name}/{rel}", g) for g in globs), rel


def test_a_damaged_shipped_toy_is_refused_in_one_line(tmp_path, monkeypatch):
    import shutil

    shipped = tmp_path / "toy_checkpoints"
    shutil.copytree(toy.SHIPPED / build_name("spell2", 0), shipped / build_name("spell2", 0))
    monkeypatch.setattr(toy, "SHIPPED", shipped)
    monkeypatch.setattr(toy, "build_toy", lambda *a, **k: pytest.fail("a shipped toy was rebuilt"))
    assert resolve_model_path("toy:spell2/student").endswith("student")
    truncate(shipped / build_name("spell2", 0) / "teacher" / "model.safetensors")
    with pytest.raises(ToyError) as err:
        resolve_model_path("toy:spell2/student")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"toy folder {shipped / build_name('spell2', 0)} (shipped with opdlab) is damaged "
                              "(teacher/model.safetensors has ")
    assert "reinstall opdlab" in message
    assert (shipped / build_name("spell2", 0) / "teacher" / "model.safetensors").is_file()  # never deleted


# ------------------------------------------------------------------------------------------ interrupted builds
def test_a_killed_build_does_not_poison_the_cache(tmp_path, monkeypatch):
    """SIGKILL mid-build (no cleanup runs): the temporary folder stays beside the target, the target does not
    exist, and the next build (the same machine, the builder gone) builds, uses and removes it."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, "tests")
        import opdlab.toy as toy
        from test_toy import TINY_TOY
        toy.TOYS["tiny"] = TINY_TOY
        real = toy.train_supervised
        def stuck(model, tokenizer, task, spec, toy_spec, desc):
            if "student" in desc:
                print("training the student", flush=True)
                time.sleep(60)
            return real(model, tokenizer, task, spec, toy_spec, desc)
        toy.train_supervised = stuck
        toy.build_toy("tiny", cache_dir={str(tmp_path)!r}, seed=0)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    assert "training the student" in iter(lambda: proc.stdout.readline().strip(), "")  # after the teacher's line
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(f".{TINY}-")]
    assert len(stale) == 1 and (stale[0] / "teacher" / "model.safetensors").is_file()
    assert not (tmp_path / TINY).exists()
    monkeypatch.setitem(toy.TOYS, "tiny", TINY_TOY)
    path = build_toy("tiny", cache_dir=tmp_path, seed=0)
    assert toy_problem(path, "tiny", 0) is None
    assert leftovers(tmp_path) == [TINY]


def test_a_temporary_folder_of_a_live_build_elsewhere_is_left_alone(tmp_path, monkeypatch):
    """A temporary folder of another machine's build (a shared cache whose lock may be per machine) is not
    removed while it may be in use; one of this machine's dead builds is."""
    monkeypatch.setitem(toy.TOYS, "tiny", TINY_TOY)
    elsewhere = tmp_path / f".{TINY}-build-othernode-123-abc"
    dead_here = tmp_path / f".{TINY}-build-{socket.gethostname()}-{2 ** 22 + 12345}-abc"
    for folder in (elsewhere, dead_here):
        (folder / "teacher").mkdir(parents=True)
    path = build_toy("tiny", cache_dir=tmp_path, seed=0)
    assert leftovers(tmp_path) == sorted([elsewhere.name, path.name])
    assert toy_problem(path, "tiny", 0) is None


def test_a_second_build_keeps_the_intact_toy_another_process_installed(tmp_path, monkeypatch):
    """Without a working lock both processes build. The one that finishes second must not rename the first one's
    intact folder aside: that process may be reading it (it raced as FileNotFoundError in the floors environment,
    because a target missing when the build began was treated as one to replace)."""
    monkeypatch.setitem(toy.TOYS, "tiny", TINY_TOY)
    ready = toy.build_toy("tiny", cache_dir=tmp_path / "elsewhere")
    cache = tmp_path / "cache"
    target = cache / TINY
    train = toy.train_toy

    def inodes() -> dict:
        return {p.relative_to(target): p.stat().st_ino for p in target.rglob("*") if p.is_file()}

    installed = {}

    def other_process_installs_meanwhile(*args, **kwargs):
        report = train(*args, **kwargs)
        shutil.copytree(ready, target)  # the other process's rename lands while this one trains
        installed.update(inodes())
        return report

    def no_locks(*args):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(toy, "train_toy", other_process_installs_meanwhile)
    monkeypatch.setattr(toy.fcntl, "flock", no_locks)
    assert toy.build_toy("tiny", cache_dir=cache) == target
    assert installed and inodes() == installed, "the other process's intact folder was replaced"
