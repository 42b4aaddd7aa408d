"""Which model `--model` names: resolved and checked before any weights load (`resolve_model`, `ModelSource`),
then loaded (`load_source`, `load_model`): a model directory or exported student, a peft adapter folder, an
opdlab run folder (its exported student), an opdlab run's Lightning checkpoint, `toy:<name>/<role>`, or a hub
id. Also where an evaluation of it goes by default (`default_out_dir`) and on which device (`pick_device`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from opdlab.evaluation.options import EvalError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".ckpt")
RUN_MARKERS = ("hparams.yaml", "config.yaml", "summary.json", "metrics.csv")  # files `opdlab fit` writes in a run


@dataclass
class ModelSource:
    """What `--model` names, resolved and checked before any weights load.

    kind: `dir` (a model directory: a local one, an exported student, a toy's), `adapter` (a peft LoRA adapter
    folder, e.g. the exported student of a `--model.student_adapter` run: `base` plus the adapter, merged at load),
    `ckpt` (a Lightning checkpoint of an opdlab run: `base` plus its weights) or `hub` (a hub id). `path` is the
    directory or file (the hub id for `hub`); `tokenizer` what the tokenizer loads from; `label` the name in tables
    and eval.json.
    """

    kind: str
    path: str
    tokenizer: str
    label: str
    base: str | None = None
    checkpoint: dict | None = field(default=None, repr=False)


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and (any((path / name).is_file() for name in RUN_MARKERS) or (path / "checkpoints").is_dir())


def newest_checkpoints(folder: Path) -> list[Path]:
    """The .ckpt files of a folder, last.ckpt first, then the newest."""
    found = sorted(folder.glob("*.ckpt"), key=lambda p: (p.name != "last.ckpt", -p.stat().st_mtime))
    return found


def has_weights(folder: Path) -> bool:
    return any(p.suffix in WEIGHT_SUFFIXES and p.is_file() for p in folder.iterdir())


def adapter_source(path: Path, model: str) -> ModelSource:
    """A peft adapter folder: its base (adapter_config.json's base_model_name_or_path) must be loadable; the
    tokenizer is the folder's own (an opdlab export saves it there) or its base's."""
    from opdlab.adapters import read_adapter_config
    from opdlab.models import TOKENIZER_FILES, resolve_model_path

    try:
        base = read_adapter_config(path, f"--model {model}").get("base_model_name_or_path")
    except ValueError as err:
        raise EvalError(str(err)) from None
    if not isinstance(base, str) or not base:
        raise EvalError(f"--model {model} is a peft adapter without a base model (no base_model_name_or_path in its "
                        f"{ADAPTER_CONFIG}); set it to the base model's directory or hub id")
    resolve_model_path(base)  # a base that is gone is refused here, in one line
    tokenizer = str(path) if any((path / f).is_file() for f in TOKENIZER_FILES) else base
    return ModelSource("adapter", str(path), tokenizer, f"{model} (LoRA adapter on {base})", base=base)


ADAPTER_CONFIG = "adapter_config.json"


def is_model_folder(path: Path) -> bool:
    """A model directory (config.json) or a peft adapter folder (adapter_config.json)."""
    return (path / "config.json").is_file() or (path / ADAPTER_CONFIG).is_file()


def resolve_model(model: str) -> ModelSource:
    """`--model` resolved: a run folder to its student/, a checkpoint opened (not its weights loaded), and every
    path that cannot be a model refused in one line that says what to pass instead."""
    from opdlab.models import resolve_model_path

    if not model or not model.strip():
        raise EvalError("--model is empty; pass a model directory, an opdlab run folder or checkpoint, "
                        "toy:<name>/student, or a hub id")
    if model.startswith("toy:"):
        path = resolve_model_path(model)
        return ModelSource("dir", path, path, model)
    path = Path(model).expanduser()
    if not path.exists():
        resolved = resolve_model_path(model)  # a missing local path is refused there; a hub id is checked
        return ModelSource("hub", resolved, resolved, model)
    if path.is_dir():
        return folder_source(path, model)
    if path.suffix == ".ckpt":
        return checkpoint_source(path, model)
    if path.suffix in WEIGHT_SUFFIXES or path.name == "config.json":
        raise EvalError(f"--model {model} is one file of a model; pass the folder that holds it (--model "
                        f"{path.parent})")
    raise EvalError(f"{model} is a file but not a Lightning checkpoint (.ckpt); pass a model directory, a run "
                    "folder, an opdlab run's .ckpt, toy:<name>/student or a hub id")


def folder_source(path: Path, model: str) -> ModelSource:
    """A folder: a model directory with its weights, a peft adapter folder, or a run folder's exported student;
    a run folder without one, a folder of checkpoints or any other folder is refused naming what to pass."""
    if (path / "config.json").is_file():
        if not has_weights(path):
            raise EvalError(f"--model {model} has a config.json but no weight files (*.safetensors, *.bin); "
                            "copy the weights next to it, or pass the folder that holds them")
        return ModelSource("dir", str(path), str(path), model)
    if (path / ADAPTER_CONFIG).is_file():
        return adapter_source(path, model)
    if is_model_folder(path / "student"):  # a run folder: its exported student
        return resolve_model(str(path / "student"))
    checkpoints = newest_checkpoints(path) or (newest_checkpoints(path / "checkpoints")
                                               if (path / "checkpoints").is_dir() else [])
    if is_run_folder(path):
        hint = (f"evaluate one of its checkpoints instead, e.g. --model {checkpoints[0]}" if checkpoints else
                "it has no checkpoints either (the run may have stopped before its first save); evaluate "
                "another run, or finish this one with `opdlab fit ... --resume`")
        raise EvalError(f"--model {model} is an opdlab run folder without an exported student (student/ is "
                        f"written when `opdlab fit` finishes); {hint}")
    if checkpoints:
        run = path.parent
        export = f"the run's exported student (--model {run / 'student'}) or " if (run / "student").is_dir() else ""
        raise EvalError(f"--model {model} is a folder of checkpoints, not a model; pass {export}one checkpoint, "
                        f"e.g. --model {checkpoints[0]}")
    raise EvalError(f"--model {model} is a folder but not a model (no config.json), not an opdlab run folder "
                    "(no student/) and holds no checkpoints; pass a model directory, a run folder, a run's "
                    ".ckpt, toy:<name>/student or a hub id")


def checkpoint_source(path: Path, model: str) -> ModelSource:
    """A .ckpt of an opdlab run, opened (memory-mapped): its base student must still be there (its config and
    tokenizer are used, its weights replaced by the checkpoint's)."""
    from opdlab.models import resolve_model_path

    checkpoint = read_checkpoint(path, model)
    base = (checkpoint.get("hyper_parameters") or {}).get("student")
    if not isinstance(base, str) or not isinstance(checkpoint.get("state_dict"), dict):
        raise EvalError(f"{model} is not a checkpoint of an opdlab run (no hyper_parameters.student); pass an "
                        "opdlab run's checkpoints/*.ckpt, its exported student folder, or a model directory")
    resolve_model_path(base)  # the base student must still be there (its config and tokenizer are used)
    return ModelSource("ckpt", str(path), base, f"{model} (weights on {base})", base=base, checkpoint=checkpoint)


def read_checkpoint(path: Path, model: str) -> dict:
    """A Lightning checkpoint, memory-mapped (its tensors are read when used); a damaged one in one line."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - a cut or damaged file fails in many ways (zip, pickle, EOF)
        reason = " ".join(str(err).split()).partition(". ")[0][:160] or type(err).__name__  # its first sentence
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        others = [p for p in newest_checkpoints(path.parent) if p != path]
        alternatives = [f"the run's exported student (--model {run / 'student'})"] if (run / "student").is_dir() else []
        alternatives += [f"another checkpoint (--model {others[0]})"] if others else []
        instead = f"; evaluate {' or '.join(alternatives)}" if alternatives else ""
        raise EvalError(f"--model {model} cannot be read as a checkpoint ({path.stat().st_size} bytes; {reason}): "
                        f"it is damaged or was cut short (a copy or save that did not finish){instead}") from None
    if not isinstance(checkpoint, dict):
        raise EvalError(f"{model} is not a checkpoint of an opdlab run (it holds a {type(checkpoint).__name__}); pass "
                        "an opdlab run's checkpoints/*.ckpt, its exported student folder, or a model directory")
    return checkpoint


def load_source(source: ModelSource, dtype: str):
    """(model, tokenizer) of a resolved source: the weights load here."""
    from opdlab.models import load_causal_lm, load_tokenizer

    if source.kind == "adapter":
        return merged_adapter(source, dtype), load_tokenizer(source.tokenizer)
    if source.kind != "ckpt":
        return load_causal_lm(source.path, dtype), load_tokenizer(source.tokenizer)
    net = load_causal_lm(source.base, dtype)
    adapter = (source.checkpoint.get("opdlab") or {}).get("adapter")
    if adapter:  # a LoRA run's checkpoint: the adapter's weights on the base, merged
        from opdlab.adapters import AdapterOptions, apply_adapter, merged_copy

        apply_adapter(net, AdapterOptions(rank=adapter["r"], alpha=adapter["lora_alpha"],
                                          target_modules=adapter["target_modules"]), source.base)
    state = {k.removeprefix("student."): v for k, v in source.checkpoint["state_dict"].items() if k.startswith("student.")}
    missing, _ = net.load_state_dict(state, strict=False)
    if adapter:
        missing = [name for name in missing if ".lora_" in name]
        if missing:
            raise EvalError(f"{source.path} lacks {len(missing)} of its LoRA adapter's weights (e.g. {missing[:2]})")
        return merged_copy(net), load_tokenizer(source.base)
    tied = {name for name in missing if name.endswith("lm_head.weight") and net.config.get_text_config().tie_word_embeddings}
    if set(missing) - tied:
        raise EvalError(f"{source.path} lacks {len(set(missing) - tied)} of the student's weights (e.g. "
                        f"{sorted(set(missing) - tied)[:2]}); is it a checkpoint of a run of {source.base}?")
    return net, load_tokenizer(source.base)


def merged_adapter(source: ModelSource, dtype: str):
    """The base model with a peft adapter folder loaded (`PeftModel.from_pretrained`) and merged into its weights."""
    from opdlab.adapters import INSTALL_HINT, peft_available
    from opdlab.models import load_causal_lm

    if not peft_available():
        raise EvalError(f"--model {source.path} is a peft adapter; loading it needs the peft package: {INSTALL_HINT}")
    from peft import PeftModel

    base = load_causal_lm(source.base, dtype)
    try:
        return PeftModel.from_pretrained(base, source.path).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as err:  # shapes or layer names of another base model
        raise EvalError(f"the adapter {source.path} does not fit its base {source.base} "
                        f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); was it made for another model?") from None


def load_model(model: str, dtype: str):
    """(model, tokenizer, what was loaded): a local HF directory or exported student, a run folder (its exported
    student), a Lightning checkpoint of an opdlab run (.ckpt: the base student plus the checkpoint's weights),
    `toy:<name>/<role>`, or a hub id where the network allows."""
    source = resolve_model(model)
    net, tokenizer = load_source(source, dtype)
    return net, tokenizer, source.label


def pick_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"device {device!r} asked for, but torch sees no CUDA device here; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise EvalError(f"device {device!r} is not a device torch knows; use auto, cpu, cuda or cuda:<index>") from None


def default_out_dir(model: str, source: ModelSource) -> Path:
    """Where an evaluation goes without --out_dir: `<run>/eval` for a run folder or its exported student (where
    `opdlab fit --eval.*` writes), `<run>/eval-<name>` for a run's checkpoint, `evals/toy_<name>_<role>` for a toy,
    `evals/<owner>_<name>` for a hub id, and `evals/<name>-<hash of the absolute path>` for any other path,
    so two models never share a folder."""
    if source.kind == "hub" or model.startswith("toy:"):
        return Path("evals") / model.replace(":", "_").replace("/", "_")
    path = Path(source.path).resolve()
    if source.kind in ("dir", "adapter") and path.name == "student" and is_run_folder(path.parent):
        return path.parent / "eval"
    if source.kind == "ckpt" and path.parent.name == "checkpoints" and is_run_folder(path.parent.parent):
        return path.parent.parent / f"eval-{path.stem}"
    return Path("evals") / f"{path.stem or 'model'}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
