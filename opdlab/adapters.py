"""LoRA students (`--model.student_adapter.*`): the options, putting a `peft` LoRA adapter on the student, and
what engines, checkpoints and exports need of an adapted student.

The adapter is injected into the student in place (`peft.get_peft_model`), so `OPDModule.student` stays the
transformers model whose forward, config, decoder and LM head the rest of opdlab uses. Its adapted linear
layers become peft `LoraLayer`s: the frozen weight is renamed `<layer>.base_layer.weight` and the adapter adds
`<layer>.lora_A.default.weight` (r, in) and `<layer>.lora_B.default.weight` (out, r), the only trainable
parameters. `plain_parameters` gives the weights under the architecture's own names (merged or base only),
which is what a rollout engine holding its own copy loads; `adapter_state` gives the adapter in peft's file
format.

peft is imported only when an adapter is asked for (`pip install -e ".[peft]"`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

INSTALL_HINT = 'install it with `pip install -e ".[peft]"` (or `pip install "peft>=0.18"`)'
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER = "default"  # peft's adapter name: the student carries one adapter
PEFT_PREFIX = "base_model.model."  # what peft's files put before the model's own parameter names


@dataclass
class AdapterOptions:
    """Train a LoRA adapter on the frozen student instead of all its weights (`pip install -e ".[peft]"`).

    Only the adapter has gradients and optimizer state; checkpoints hold the adapter and its optimizer state;
    the exported student is the adapter in peft's format (`PeftModel.from_pretrained`; `opdlab eval --model`
    takes it). Rollout engines generate with the adapted student; the vllm engine serves the base once and
    loads the adapter after every step.

    Args:
        rank: the LoRA rank r (>= 1). null (default): no adapter, full fine-tuning; set it (or `path`) to
            train an adapter.
        alpha: LoRA's alpha: the update is scaled by alpha / rank (null: 2 * rank).
        dropout: dropout on the adapter's input in training, in [0, 1) (rollouts run without it).
        target_modules: names of the linear layers that get an adapter (a layer matches when its name ends
            with one of them). null: the attention and MLP projections of Qwen2/Qwen3/Llama-style models
            (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj). `lm_head` may be added: the head
            then runs through its module (every kept row at once, not opdlab's chunked head loss), and the
            vllm engine merges the adapter into full weights every step instead of serving it.
        path: a peft LoRA adapter folder to continue from (e.g. one made by SFT on this student); its
            adapter_config.json then sets rank, alpha and target modules (rank, alpha and target_modules
            must be left unset or equal). It must fit the student: layer names and shapes are checked. It must be
            a plain LoRA adapter, which opdlab merges exactly: DoRA, modules_to_save, per-layer ranks or alphas,
            rsLoRA and the other LoRA variants are refused (merge such an adapter with peft and train on that).
        export_merged: also export the merged model (base + adapter, a plain checkpoint) to `student/merged`.
    """

    rank: int | None = None
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: list[str] | None = None
    path: str | None = None
    export_merged: bool = False

    def __post_init__(self) -> None:
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"student_adapter.rank must be an integer >= 1 (the LoRA rank; null: no adapter), "
                             f"got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"student_adapter.alpha must be > 0 (the update is scaled by alpha / rank), got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"student_adapter.dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not self.target_modules or not all(
                    isinstance(t, str) and t for t in self.target_modules):
                raise ValueError("student_adapter.target_modules must be a non-empty list of layer names (e.g. "
                                 f"[q_proj, v_proj]) or null for the default, got {self.target_modules!r}")
        if self.path is not None and not self.path:
            raise ValueError("student_adapter.path is empty; pass a peft adapter folder or null")
        if self.enabled and not peft_available():  # before any model loads
            raise ImportError(f"student_adapter options need the peft package, which is not installed: {INSTALL_HINT}")
        folder = Path(self.path).expanduser() if self.path else None
        if folder is not None and (folder / "adapter_config.json").is_file():  # an adapter opdlab cannot merge: now
            read_adapter_config(folder, f"student_adapter.path {self.path}")

    @property
    def enabled(self) -> bool:
        """An adapter is trained (rank or path given)."""
        return self.rank is not None or self.path is not None

    def lora_config(self):
        """The `peft.LoraConfig` of a new adapter (`path` unset)."""
        from peft import LoraConfig

        alpha = self.alpha if self.alpha is not None else 2 * self.rank
        return LoraConfig(r=self.rank, lora_alpha=alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules or DEFAULT_TARGETS), bias="none")


def peft_available() -> bool:
    """Whether the peft package is installed (not imported)."""
    from importlib.util import find_spec

    return find_spec("peft") is not None


# ----------------------------------------------------------------------------- putting the adapter on
def apply_adapter(model: nn.Module, options: AdapterOptions, model_name: str) -> nn.Module:
    """Inject a LoRA adapter into `model` in place (new, or `options.path`'s); every other weight is frozen.
    Returns `model` itself (a transformers model whose adapted layers are peft `LoraLayer`s)."""
    from peft import PeftModel, get_peft_model

    if options.path is None:
        config = options.lora_config()
        check_targets(model, config.target_modules, model_name)
        get_peft_model(model, config)
    else:
        check_adapter_fits(model, options, model_name)
        PeftModel.from_pretrained(model, str(Path(options.path).expanduser()), is_trainable=True)
    return model


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (what target_modules are matched against)."""
    return sorted({name.rpartition(".")[2] for name, module in model.named_modules() if isinstance(module, nn.Linear)})


def check_targets(model: nn.Module, targets, model_name: str) -> None:
    """Every target names at least one linear layer of the model; else one line listing those that exist."""
    names = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        raise ValueError(f"student_adapter.target_modules {missing} match no linear layer of {model_name} "
                         f"({type(model).__name__}); its linear layers are named {linear_layer_names(model)}")


def check_adapter_fits(model: nn.Module, options: AdapterOptions, model_name: str):
    """The adapter folder's config (a `peft.LoraConfig`), after checking that it is a LoRA adapter opdlab can merge
    exactly (`read_adapter_config`) and of this student: every adapted layer is one of its linear layers, with the
    adapter's shapes. One line naming the mismatch otherwise."""
    from peft import LoraConfig
    from safetensors import safe_open

    folder = Path(options.path).expanduser()
    config_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"student_adapter.path {options.path} is not a peft adapter folder (it needs "
                                "adapter_config.json and adapter_model.safetensors, as PeftModel.save_pretrained writes)")
    raw = read_adapter_config(folder, f"student_adapter.path {options.path}")
    try:
        config = LoraConfig.from_pretrained(str(folder))
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"student_adapter.path {options.path}: its adapter_config.json is not a LoRA config peft can "
                         f"read ({type(err).__name__}: {one_line(err)}); re-save the adapter with "
                         "PeftModel.save_pretrained") from None
    if isinstance(config.r, bool) or not isinstance(config.r, int) or config.r < 1:
        raise ValueError(f"student_adapter.path {options.path}: its adapter_config.json gives rank r={config.r!r}; a "
                         "LoRA rank is an integer >= 1")
    given = {"rank": (options.rank, config.r), "alpha": (options.alpha, config.lora_alpha),
             "target_modules": (options.target_modules and set(options.target_modules),
                                config.target_modules and set(config.target_modules))}
    clashes = [f"{name}={mine!r} (the adapter's: {theirs!r})" for name, (mine, theirs) in given.items()
               if mine is not None and mine != theirs]
    if clashes:
        raise ValueError(f"student_adapter.path {options.path} sets these itself: {', '.join(clashes)}; leave them "
                         "unset to continue that adapter, or drop path to train a new one")
    modules = dict(model.named_modules())
    base = raw.get("base_model_name_or_path") or "an unnamed model"
    with safe_open(str(weights), framework="pt") as f:  # readable: read_adapter_config opened it
        for key in f.keys():
            if key.endswith(BASE_COPY):
                layer, part = key[:-len(BASE_COPY)], ""
            else:
                layer, _, part = key.rpartition(".lora_")
            shape = f.get_slice(key).get_shape()
            module = modules.get(layer.removeprefix(PEFT_PREFIX))
            if module is None:
                raise ValueError(f"student_adapter.path {options.path} was made for another base model ({base}): its "
                                 f"layer {layer.removeprefix(PEFT_PREFIX)} does not exist in {model_name}")
            if not isinstance(module, nn.Linear):
                raise ValueError(f"student_adapter.path {options.path}: its layer {layer.removeprefix(PEFT_PREFIX)} "
                                 f"is a {type(module).__name__} in {model_name}; opdlab merges LoRA on nn.Linear "
                                 f"layers only: {MERGE_IT}")
            if not part:  # peft's copy of an adapted lm_head's weight: loading it must change nothing
                copy = f.get_tensor(key)
                if copy.shape != module.weight.shape or not torch.equal(copy.to(module.weight.dtype), module.weight):
                    raise ValueError(f"student_adapter.path {options.path} was made for another base model ({base}): "
                                     f"its copy of {layer.removeprefix(PEFT_PREFIX)}.weight (peft saves one with an "
                                     f"adapted lm_head) differs from {model_name}'s")
                continue
            expected = {"A.weight": [config.r, module.weight.shape[1]], "B.weight": [module.weight.shape[0], config.r]}
            if list(shape) != expected[part]:
                raise ValueError(f"student_adapter.path {options.path} was made for another base model ({base}): "
                                 f"{key.removeprefix(PEFT_PREFIX)} is {list(shape)}, {model_name}'s layer needs "
                                 f"{expected[part]}")
    return config


def one_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__


def read_adapter_config(folder: Path, label: str) -> dict:
    """The JSON object in `folder`/adapter_config.json, once `check_mergeable` has found the adapter to be one opdlab
    merges and exports exactly. Every way an existing adapter enters opdlab reads its folder here:
    `--model.student_adapter.path` (a fit, and its `--resume`, which builds the student again) and `opdlab eval
    --model <adapter folder>`. One line (ValueError) naming the folder otherwise."""
    try:
        raw = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{label}: its adapter_config.json cannot be read as JSON ({one_line(err)}); is it a peft "
                         "adapter folder? PeftModel.save_pretrained writes one") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{label}: its adapter_config.json holds a {type(raw).__name__}, not the JSON object peft "
                         "writes; is it a peft adapter folder?")
    check_mergeable(folder, raw, label)
    return raw


# ----------------------------------------------------------------------------- adapters opdlab merges exactly
# opdlab treats an adapter as plain LoRA: on every adapted nn.Linear layer, W + lora_alpha / r * B @ A, with lora_A
# and lora_B its only tensors. That is what it merges (`plain_parameters`: the static engine's copy, `export_merged`,
# a vLLM student served merged), exports (`adapter_state`) and records in checkpoints (`r`, `lora_alpha` and
# `target_modules` only: `opdlab eval` of a checkpoint builds the adapter again from them). Every field of peft's
# LoraConfig either is one of those, or only records where the adapter comes from, or must keep peft's default:
# any other value changes what the adapter computes or holds, and is refused (`check_mergeable`).
FREE_FIELDS = frozenset({"r", "lora_alpha", "lora_dropout",  # what opdlab records, and the training-only dropout
                         "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                         "inference_mode", "runtime_config"})  # where the adapter comes from, how peft runs it
ONLY_WITH = {"megatron_core": "megatron_config", "qalora_group_size": "use_qalora",
             "layers_pattern": "layers_to_transform"}  # settings of a feature that is off unless the other field is set
INITS = (True, False, "gaussian", "orthogonal")  # they set lora_A/lora_B only, which the adapter's file replaces
CHECKED_FIELDS = {  # fields with more than one value opdlab handles: whether a value is one of them
    "target_modules": lambda value: value is None or value == "all-linear" or (  # peft lists the layers at load
        isinstance(value, list) and all(isinstance(name, str) for name in value)),
    "init_lora_weights": lambda value: any(value is init if isinstance(init, bool) else value == init
                                           for init in INITS),
    "task_type": lambda value: value in (None, "CAUSAL_LM"),
}
MERGE_IT = ("merge it into its base with peft (PeftModel.from_pretrained(base, folder).merge_and_unload()"
            ".save_pretrained(out)) and pass that model instead (--model.student for a new adapter, or opdlab eval "
            "--model), or use a plain LoRA adapter")
WHY = {  # why opdlab would get a field's non-default value wrong
    "use_dora": "DoRA's magnitude vectors are outside opdlab's merge, base + alpha / r * B @ A",
    "modules_to_save": "whole trained modules are outside opdlab's merge, checkpoints and export (lora_A and lora_B "
                       "only)",
    "trainable_token_indices": "trained embedding rows are outside opdlab's merge, checkpoints and export",
    "bias": "trained biases are outside opdlab's export (lora_A and lora_B only)",
    "lora_bias": "a bias on lora_B is outside opdlab's merge, base + alpha / r * B @ A",
    "rank_pattern": "opdlab records one rank for every layer (its checkpoints; opdlab eval of a checkpoint)",
    "alpha_pattern": "opdlab records one alpha for every layer (its checkpoints; opdlab eval of a checkpoint)",
    "use_rslora": "opdlab records the scale as alpha / r (its checkpoints; opdlab eval of a checkpoint), rsLoRA's "
                  "is alpha / sqrt(r)",
    "fan_in_fan_out": "it is for GPT-2-style Conv1D layers; opdlab adapts nn.Linear layers only",
    "layers_to_transform": "opdlab records the adapted layers by target_modules alone (its checkpoints)",
    "exclude_modules": "opdlab records the adapted layers by target_modules alone (its checkpoints)",
    "target_modules": "opdlab records the adapted layers as a list of layer names (its checkpoints), not a regular "
                      "expression",
    "init_lora_weights": "this initialisation rewrites the base weights or needs its own data; opdlab puts the "
                         "adapter on the unchanged base",
    "layer_replication": "replicated layers are outside opdlab's merge",
    "alora_invocation_tokens": "an activated LoRA applies after its invocation tokens only; a merge applies it "
                               "everywhere",
    "target_parameters": "LoRA on parameters is outside opdlab's merge (nn.Linear layers only)",
    "task_type": "opdlab trains causal LMs (task_type CAUSAL_LM)",
    "ensure_weight_tying": "adapters tied across tied weights are outside opdlab's merge",
    "megatron_config": "Megatron's parallel layers are outside opdlab's merge (nn.Linear layers only)",
    "use_qalora": "QA-LoRA's pooled input is outside opdlab's merge",
}
OTHER_VARIANT = "a LoRA variant outside opdlab's merge, base + alpha / r * B @ A"
BASE_COPY = ".base_layer.weight"  # peft saves the base weight of an adapted lm_head (or embedding) beside the adapter
KEY = re.compile(r"\.(lora_[AB]|base_layer)\.weight$")  # the tensors a plain LoRA adapter's file may hold


def lora_defaults() -> dict:
    """Every field of peft's LoraConfig with its default, as adapter_config.json writes it."""
    from peft import LoraConfig

    return json.loads(json.dumps(LoraConfig().to_dict(), default=str))


def empty(value) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def check_mergeable(folder: Path, raw: dict, label: str) -> None:
    """One line (ValueError) naming `label` (the option and the folder), each field whose value opdlab cannot
    merge or export exactly (see `WHY`) with its value, and what to do instead; nothing when the adapter is a plain
    LoRA adapter. A field this peft does not know (a newer peft wrote it) passes only when it is empty. The
    weights file, where there is one, may hold lora_A and lora_B tensors of linear layers only (LoRA on an embedding
    keeps other tensors, and a config edited by hand may not say what its file holds)."""
    from peft import __version__ as peft_version

    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{label} holds a {raw.get('peft_type')} adapter; opdlab trains and merges LoRA adapters only")
    defaults = lora_defaults()
    refused, unknown = [], []
    for name, value in raw.items():
        if name in CHECKED_FIELDS:
            fine = CHECKED_FIELDS[name](value)
        elif name in FREE_FIELDS:
            continue
        elif name not in defaults:
            if not empty(value):
                unknown.append(f"{name}={shown(value)}")
            continue
        elif name in ONLY_WITH and empty(raw.get(ONLY_WITH[name])):
            continue
        else:
            fine = value == defaults[name] or (empty(value) and empty(defaults[name]))
        if not fine:
            refused.append(f"{name}={shown(value)} ({WHY.get(name, OTHER_VARIANT)})")
    if refused:
        raise ValueError(f"{label}: its adapter_config.json sets {'; '.join(refused)}: opdlab cannot merge or export "
                         f"this adapter exactly; {MERGE_IT}")
    if unknown:
        raise ValueError(f"{label}: its adapter_config.json sets {', '.join(unknown)}, which peft {peft_version} does "
                         "not know (a newer peft wrote it) and would ignore; upgrade peft (pip install -U peft) so "
                         "that opdlab can check it")
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        others = [key for key in tensor_names(weights, label) if not KEY.search(key)]
        if others:
            raise ValueError(f"{label}: its adapter_model.safetensors holds {others[0].removeprefix(PEFT_PREFIX)}"
                             f"{f' (and {len(others) - 1} more)' if len(others) > 1 else ''}, not a lora_A or lora_B "
                             "weight of a linear layer (LoRA on an embedding, a trained module or bias): opdlab cannot "
                             f"merge or export it exactly; {MERGE_IT}")


def shown(value) -> str:
    """A config value as adapter_config.json writes it (shortened)."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def tensor_names(weights: Path, label: str) -> list[str]:
    """The tensor names of a safetensors file; one line when it cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            return list(f.keys())
    except Exception as err:  # safetensors raises its own SafetensorError (no common base with OSError)
        raise ValueError(f"{label}: adapter_model.safetensors cannot be read ({one_line(err)}); the file is damaged "
                         "or not a safetensors file") from None


def check_not_adapter_folder(name: str, option: str) -> None:
    """A model path (`option`, e.g. --model.student) that is a peft adapter folder, not a model, in one line: what to
    pass instead (transformers would load the adapter onto its base unmerged and frozen). Nothing otherwise."""
    folder = Path(name).expanduser()
    if not (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
        return
    raw = read_adapter_config(folder, f"{option} {name}")  # an adapter opdlab cannot merge is refused for that first
    base = raw.get("base_model_name_or_path") or "<its base model>"
    raise ValueError(f"{option} {name} is a peft adapter folder, not a model; to continue training it pass its base "
                     f"as {option} {base} and the folder as --model.student_adapter.path {name}")


# ----------------------------------------------------------------------------- reading an adapted student
def is_adapted(model: nn.Module) -> bool:
    """The model carries a peft adapter (injected in place; after a merge, peft < 0.21 leaves `peft_config`)."""
    return isinstance(getattr(model, "peft_config", None), dict) and any(
        ".lora_" in name for name, _ in model.named_parameters())


def adapter_config(model: nn.Module):
    """The student's `peft.LoraConfig` (None without an adapter)."""
    return model.peft_config[ADAPTER] if is_adapted(model) else None


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """name -> peft LoRA layer of every adapted layer."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP2-sharded) parameter: a collective on every rank when sharded."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach()


def plain_parameters(model: nn.Module, merged: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) of every parameter under the architecture's own names (a tied one under each of its
    names), one at a time. An adapted layer's weight is its base weight plus the adapter's update (`merged`) or
    the base weight alone; the adapter's own tensors are left out. For a model without an adapter: its
    parameters as they are."""
    layers = lora_layers(model) if is_adapted(model) else {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if ".lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".base_layer.")
        tensor = full(param)
        if merged and owner in layers and leaf == "weight":
            tensor = tensor + lora_delta(layers[owner]).to(tensor.dtype)
        yield name.replace(".base_layer.", "."), tensor


def lora_delta(layer: nn.Module) -> torch.Tensor:
    """scaling * B @ A of a LoRA linear layer: what merging adds to its (out, in) weight."""
    a, b = full(layer.lora_A[ADAPTER].weight), full(layer.lora_B[ADAPTER].weight)
    delta = (b.float() @ a.float()) * layer.scaling[ADAPTER]
    return delta.T if getattr(layer, "fan_in_fan_out", False) else delta


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's file names (`base_model.model.<layer>.lora_A.weight`), whole."""
    suffix = f".{ADAPTER}.weight"
    return {PEFT_PREFIX + name.replace(suffix, ".weight"): full(param).contiguous()
            for name, param in model.named_parameters() if ".lora_" in name}


def save_adapter(model: nn.Module, folder: str | Path, base_model: str, state: dict | None = None) -> int:
    """Write the adapter in peft's format (adapter_config.json, adapter_model.safetensors); returns the bytes of
    its tensors. `base_model` is recorded as its base (a toy name or path that opdlab resolves)."""
    from copy import deepcopy

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = adapter_state(model) if state is None else state
    config = deepcopy(adapter_config(model))
    config.base_model_name_or_path = base_model
    config.inference_mode = True
    save_file({k: v.cpu() for k, v in state.items()}, str(folder / "adapter_model.safetensors"))
    config.save_pretrained(str(folder))
    return sum(v.numel() * v.element_size() for v in state.values())


def describe(model: nn.Module) -> str:
    """One line: the adapter's rank, alpha, targets and trainable share."""
    config = adapter_config(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    targets = sorted(config.target_modules) if not isinstance(config.target_modules, str) else config.target_modules
    return (f"LoRA student: rank {config.r}, alpha {config.lora_alpha:g}, targets {targets}: "
            f"{trainable:,} trainable of {total:,} parameters ({trainable / max(total, 1):.2%})")


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain model of the same architecture holding the merged weights (on the CPU)."""
    from copy import deepcopy

    with torch.device("meta"):
        plain = type(model)(deepcopy(model.config))
    plain.to_empty(device="cpu")
    plain.tie_weights()  # to_empty gives every parameter new storage; re-tie a tied head
    plain.to(model.get_input_embeddings().weight.dtype)  # the base's dtype (a bf16 student's adapter may be fp32)
    targets = dict(plain.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, tensor in plain_parameters(model):
            targets[name].copy_(tensor)
        sources = dict(model.named_buffers())
        for name, buffer in plain.named_buffers():
            buffer.copy_(full(sources[name]))
    return plain.eval()
