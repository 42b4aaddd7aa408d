"""Which model and which benchmark, by content rather than by path: sha256 fingerprints of a model's files, of
a checkpoint's tensors, of a model in memory and of a benchmark's problems as evaluated. eval.json records them;
stored responses are reused only where they are the same."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from opdlab.evaluation.sources import WEIGHT_SUFFIXES, ModelSource

if TYPE_CHECKING:
    from opdlab.evaluation.benchmarks import LoadedBenchmark

OWN_FILES = ("responses.jsonl", "eval.json", "result.json", "results.md")
NOT_MODEL_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".gif", ".partial", ".tmp")


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, streamed in 1 MiB blocks (about a second per GB)."""
    return hash_file_into(hashlib.sha256(), path).hexdigest()


def hash_file_into(digest, path: Path):
    """Feed a file's bytes to `digest` in 1 MiB blocks (never the whole file in memory); returns `digest`."""
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


def folder_sha256(folder: Path, weights: bool = True) -> str:
    """sha256 over the names and contents of a model folder's files (weights, config, tokenizer, chat
    template, code): not its subfolders, documentation, hidden files or an evaluation written into it.
    `weights=False` leaves the weight files out (a checkpoint's base: its weights are replaced)."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if (not path.is_file() or path.name.startswith(".") or path.name in OWN_FILES
                or path.suffix.lower() in NOT_MODEL_SUFFIXES or path.name.upper().startswith("LICENSE")
                or (not weights and path.suffix in WEIGHT_SUFFIXES)):
            continue
        digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def hub_revision(name: str) -> str | None:
    """The commit of a hub model in the local hub cache (what from_pretrained loads), or None if not there."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json")
    return Path(found).parent.name if isinstance(found, str) else None


def base_fingerprint(base: str, weights: bool = False) -> str | None:
    """A checkpoint's base student: its config and tokenizer files (its weights are the checkpoint's); an
    adapter's base (`weights`): its weights too."""
    from opdlab.models import resolve_model_path

    path = Path(resolve_model_path(base))
    if path.is_dir():
        return folder_sha256(path, weights=weights)
    revision = hub_revision(base)
    return f"{base}@{revision}" if revision else None


def model_fingerprint(source: ModelSource) -> str | None:
    """`sha256:<hex>` of what the model is made of, not where it lies: a re-exported student or a folder replaced
    in place gets another. A directory: its files; a checkpoint: the student's tensors in it and its base's
    config and tokenizer files; a hub id: the cached commit (None while it is not in the cache)."""
    digest = hashlib.sha256()
    if source.kind == "dir":
        digest.update(b"dir\0" + folder_sha256(Path(source.path)).encode())
    elif source.kind == "adapter":  # the adapter's files and its base's, weights included
        base = base_fingerprint(source.base, weights=True)
        if base is None:
            return None
        digest.update(b"adapter\0" + folder_sha256(Path(source.path)).encode() + b"\0" + base.encode())
    elif source.kind == "ckpt":
        base = base_fingerprint(source.base)
        if base is None:
            return None
        digest.update(b"ckpt\0" + tensors_sha256(source.checkpoint["state_dict"], "student.").encode()
                      + b"\0" + base.encode())
    else:
        revision = hub_revision(source.path)
        if revision is None:
            return None
        digest.update(f"hub\0{source.path}@{revision}".encode())
    return "sha256:" + digest.hexdigest()


def tensors_sha256(state: dict, prefix: str = "") -> str:
    """sha256 over the names, dtypes, shapes and bytes of the tensors whose names start with `prefix`."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(k for k in state if k.startswith(prefix)):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}\0{flat.dtype}\0{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def weights_fingerprint(model) -> str:
    """The fingerprint of a model in memory (its tensors), where its files are not known."""
    return "sha256:" + hashlib.sha256(b"weights\0" + tensors_sha256(model.state_dict()).encode()).hexdigest()


def benchmark_fingerprint(bench: LoadedBenchmark) -> str:
    """sha256 of the problems as evaluated (after limit and prompt template): an edited benchmark file (or a
    changed toy task) is another benchmark, even under the same path."""
    rows = json.dumps([[p.prompt, p.answer] for p in bench.problems], ensure_ascii=False)
    return "sha256:" + hashlib.sha256(rows.encode()).hexdigest()
