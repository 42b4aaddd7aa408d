"""The embedded toy: `add2` builds, passes its accuracy gates, caches, and failed builds leave nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO_ROOT

import opdlab.toy as toy
from opdlab.models import load_causal_lm, load_tokenizer, resolve_model_path
from opdlab.tasks import AdditionTask
from opdlab.toy import ModelSpec, ToySpec, build_char_tokenizer, build_toy, evaluate_accuracy


@pytest.fixture(scope="module")
def add2(tmp_path_factory):
    """The real add2 build (seed 0) into a fresh cache directory (~20-40 s on 2 cores)."""
    cache = tmp_path_factory.mktemp("toy_cache")
    return cache, build_toy("add2", cache_dir=cache / "toy", seed=0)


def test_add2_builds_and_passes_gates(add2):
    _, path = add2
    assert path.name == f"add2-v{toy.TOYS['add2'].version}-seed0"
    report = json.loads((path / "build.json").read_text())
    assert report["teacher"]["accuracy"] >= 0.95
    assert 0.20 <= report["student"]["accuracy"] <= 0.60
    assert report["teacher"]["params"] > report["student"]["params"]


def test_add2_checkpoints_reload_and_reproduce_gate_accuracy(add2):
    """The saved HF checkpoints (not the in-memory models) meet the gates on the held-out problems."""
    _, path = add2
    task = AdditionTask(**toy.TOYS["add2"].task, seed=0)
    report = json.loads((path / "build.json").read_text())
    for role in ("teacher", "student"):
        tokenizer = load_tokenizer(str(path / role))
        assert tokenizer.get_vocab() == build_char_tokenizer().get_vocab()
        assert tokenizer.padding_side == "left"
        model = load_causal_lm(str(path / role)).eval()
        assert type(model).__name__ == "Qwen2ForCausalLM"
        accuracy = evaluate_accuracy(model, tokenizer, task)
        assert accuracy == pytest.approx(report[role]["accuracy"], abs=1e-9)


def test_cached_build_is_reused(add2, monkeypatch):
    cache, path = add2
    monkeypatch.setattr(toy, "train_supervised", lambda *a, **k: pytest.fail("cached toy was rebuilt"))
    assert build_toy("add2", cache_dir=cache / "toy", seed=0) == path
    # `toy:` model paths resolve through $OPDLAB_CACHE/toy without building.
    monkeypatch.setenv("OPDLAB_CACHE", str(cache))
    assert resolve_model_path("toy:add2/teacher") == str(path / "teacher")
    assert resolve_model_path("toy:add2/student") == str(path / "student")


TINY_TOY = ToySpec(
    task={"digits": 1, "num_eval": 8},
    teacher=ModelSpec(hidden=16, layers=1, ffn=32, heads=2, kv_heads=1, max_steps=2, gate=(0.0, 1.0)),
    student=ModelSpec(hidden=16, layers=1, ffn=32, heads=2, kv_heads=1, max_steps=2, gate=(0.0, 1.0)),
    batch_size=8,
    eval_every=1,
)


def leftovers(cache: Path) -> list[str]:
    """What a build left in the cache, besides its lock file (kept on purpose: deleting it would race)."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))


def test_failed_gate_leaves_no_directory(tmp_path, monkeypatch):
    # The student can never reach an accuracy above 100%: the gate fails after the teacher was saved.
    spec = ToySpec(**{**TINY_TOY.__dict__,
                      "student": ModelSpec(**{**TINY_TOY.student.__dict__, "gate": (1.01, 1.0)})})
    monkeypatch.setitem(toy.TOYS, "tiny", spec)
    with pytest.raises(RuntimeError, match="outside its gate"):
        build_toy("tiny", cache_dir=tmp_path, seed=0)
    assert leftovers(tmp_path) == []


def test_interrupted_build_leaves_no_directory(tmp_path, monkeypatch):
    monkeypatch.setitem(toy.TOYS, "tiny", TINY_TOY)
    real = toy.train_supervised

    def interrupted(model, tokenizer, task, spec, toy_spec, desc):
        if "student" in desc:
            raise KeyboardInterrupt
        return real(model, tokenizer, task, spec, toy_spec, desc)

    monkeypatch.setattr(toy, "train_supervised", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_toy("tiny", cache_dir=tmp_path, seed=0)
    assert leftovers(tmp_path) == []


def test_successful_tiny_build_then_forced_rebuild(tmp_path, monkeypatch):
    monkeypatch.setitem(toy.TOYS, "tiny", TINY_TOY)
    path = build_toy("tiny", cache_dir=tmp_path, seed=0)
    assert leftovers(tmp_path) == [path.name]  # no temporary directory left over
    assert {p.name for p in path.iterdir()} == {"teacher", "student", "build.json"}
    first = (path / "build.json").read_text()
    assert build_toy("tiny", cache_dir=tmp_path, seed=0, force=True) == path
    assert leftovers(tmp_path) == [path.name]
    assert json.loads((path / "build.json").read_text())["name"] == json.loads(first)["name"] == "tiny"


def test_unknown_toy():
    with pytest.raises(ValueError, match="unknown toy 'nope'; available: \\['add2', 'add3'"):
        build_toy("nope")


def test_concurrent_builds_wait_and_reuse(tmp_path, monkeypatch):
    """Two first runs at once: one trains, the other waits for the lock and reuses the build."""
    monkeypatch.setitem(toy.TOYS, "tiny", TINY_TOY)
    real, trained = toy.train_supervised, []

    def slow(model, tokenizer, task, spec, toy_spec, desc):
        trained.append(desc)
        time.sleep(0.3)
        return real(model, tokenizer, task, spec, toy_spec, desc)

    monkeypatch.setattr(toy, "train_supervised", slow)
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: build_toy("tiny", cache_dir=tmp_path, seed=0), range(2)))
    assert paths[0] == paths[1] and (paths[0] / "build.json").is_file()
    assert sorted(trained) == ["toy tiny: student", "toy tiny: teacher"]  # one build, not two
    assert leftovers(tmp_path) == [paths[0].name]


def test_stale_temporary_directories_are_removed_by_the_next_build(tmp_path, monkeypatch):
    monkeypatch.setitem(toy.TOYS, "tiny", TINY_TOY)
    stale = tmp_path / f".tiny-v{TINY_TOY.version}-seed0-abc123"
    (stale / "teacher").mkdir(parents=True)  # what a SIGKILLed build leaves
    other = tmp_path / ".add3-v1-seed0-xyz"  # another toy's: not ours to remove
    other.mkdir()
    path = build_toy("tiny", cache_dir=tmp_path, seed=0)
    assert leftovers(tmp_path) == sorted([other.name, path.name])


def test_sigterm_during_a_build_removes_its_temporary_directory(tmp_path):
    code = f"""
import sys, time
sys.path.insert(0, "tests")
import opdlab.toy as toy
from test_toy import TINY_TOY
toy.TOYS["tiny"] = TINY_TOY
def stuck(*args, **kwargs):
    print("training", flush=True)
    time.sleep(60)
toy.train_supervised = stuck
toy.build_toy("tiny", cache_dir={str(tmp_path)!r}, seed=0)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "training"
    assert any(p.name.startswith(".tiny-") and p.is_dir() for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------- shipped builds
@pytest.mark.parametrize("name", ["add3", "spell2", "scratch4", "mix4"])
def test_default_toys_ship_with_the_package_and_pass_their_gates(name, monkeypatch):
    """`toy:add3/...` and `toy:spell2/...` resolve to files inside the package (the same on every machine),
    never to a build; the shipped models still reach their gates on the held-out set."""
    monkeypatch.setattr(toy, "build_toy", lambda *a, **k: pytest.fail("a shipped toy was rebuilt"))
    spec = toy.TOYS[name]
    for role in ("teacher", "student"):
        path = Path(resolve_model_path(f"toy:{name}/{role}"))
        assert path == toy.SHIPPED / f"{name}-v{spec.version}-seed0" / role
        model, tokenizer = load_causal_lm(str(path)).eval(), load_tokenizer(str(path))
        accuracy = evaluate_accuracy(model, tokenizer, toy.make_task(spec, 0))  # the task's response length
        lo, hi = getattr(spec, role).gate
        assert lo <= accuracy <= hi, (role, accuracy)
        built = json.loads((path.parent / "build.json").read_text())[role]["accuracy"]
        assert accuracy == pytest.approx(built, abs=1e-9)  # the numbers the build recorded reproduce


def test_other_seeds_are_built_on_first_use(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPDLAB_TOY_SEED", "7")
    monkeypatch.setenv("OPDLAB_CACHE", str(tmp_path))
    built = []
    monkeypatch.setattr(toy, "build_toy", lambda name, seed: built.append((name, seed)) or tmp_path / "x")
    assert resolve_model_path("toy:add3/student") == str(tmp_path / "x" / "student")
    assert built == [("add3", 7)]
    assert "building toy 'add3' (seed 7) once" in capsys.readouterr().out


@pytest.mark.slow
def test_a_rebuild_on_the_same_machine_writes_the_same_weights(tmp_path):
    """Two builds of add2 with one torch thread (as `opdlab toy` builds) give byte-identical weights."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = build_toy("add2", cache_dir=tmp_path / "a", seed=0)
        second = build_toy("add2", cache_dir=tmp_path / "b", seed=0)
    finally:
        torch.set_num_threads(threads)
    for role in ("teacher", "student"):
        assert (first / role / "model.safetensors").read_bytes() == (second / role / "model.safetensors").read_bytes()
