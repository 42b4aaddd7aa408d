"""Loading HF causal LMs and tokenizers, freezing the teacher, and the tokenizer and vocabulary checks
(the logit head is `opdlab.heads.LogitHead`).

Every model path goes through `resolve_model_path`, so the embedded toy checkpoints (`toy:...`), local
directories and hub ids all reach the same `from_pretrained` code the tests exercise.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # transformers is imported where models are loaded: `opdlab plugins` / --help stay fast
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opdlab.options import DTYPES  # noqa: E402 (the dtype options; also read from here)


def resolve_model_path(name: str) -> str:
    """Turn `toy:<task>/<role>` into a local checkpoint (built on first use) and check local paths.

    Hub ids (`Qwen/Qwen3-1.7B`) pass through unchanged; a path that looks local but does not exist
    raises here, before anything is loaded.
    """
    if name.startswith("toy:"):
        from opdlab.toy import resolve_toy_path  # toy imports transformers and tokenizers: only when asked

        return str(resolve_toy_path(name))
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).exists()
    path = Path(name).expanduser()
    if looks_local and not path.exists():
        raise FileNotFoundError(
            f"model path {name!r} does not exist; pass a local checkpoint directory, a hub id such as "
            "'Qwen/Qwen3-1.7B', or a toy model such as 'toy:add3/student' (see `opdlab toy --help`)"
        )
    if not looks_local:
        check_hub_model(name)
    return str(path) if looks_local else name


def check_hub_model(name: str) -> None:
    """A hub id that is not in the local hub cache must be reachable: say so at once, in one line, rather
    than after transformers' minute of retries. Offline mode (HF_HUB_OFFLINE=1) leaves it to the cache."""
    import os

    from huggingface_hub import HfApi, try_to_load_from_cache

    if os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0") or isinstance(
            try_to_load_from_cache(name, "config.json"), str):
        return
    try:
        HfApi().model_info(name, timeout=10)
    except Exception as err:  # noqa: BLE001 - connection errors, unknown repos, gated repos: each is said below
        kind = type(err).__name__
        if "NotFound" in kind:
            raise FileNotFoundError(f"model {name!r} is neither a local directory nor a model on the hub; pass a "
                                    "local checkpoint directory or an existing hub id") from None
        if "Gated" in kind or "401" in str(err) or "403" in str(err):
            raise PermissionError(f"model {name!r} on the hub needs access (log in with `hf auth login` after "
                                  "accepting its terms)") from None
        raise ConnectionError(f"model {name!r} is not a local directory, not in the hub cache, and the hub cannot be "
                              f"reached from here ({kind}: {str(err).splitlines()[0][:120]}); download it where there "
                              "is network and pass its local directory") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer with left padding (prompts are left-padded for generation).

    A local model directory without tokenizer files is refused here: transformers would build an empty
    tokenizer from the config alone, and the failure would surface later as a confusing vocabulary or
    reshape error.
    """
    path = resolve_model_path(name)
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer in {path} (looked for {', '.join(TOKENIZER_FILES)}); save the tokenizer next to the "
            "weights (tokenizer.save_pretrained(dir)) or copy its files from the original model"
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name: str, dtype: str = "float32") -> PreTrainedModel:
    """Load a causal LM from a local path or hub id in `dtype` (float32, bfloat16 or float16)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    from transformers import AutoModelForCausalLM

    from opdlab.console import transformers_bars_only_on_a_terminal

    transformers_bars_only_on_a_terminal()
    path = resolve_model_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except OSError as err:
        raise OSError(
            f"could not load model {name!r} ({err}); this machine may have no hub access: "
            "download it elsewhere and pass the local directory"
        ) from err
    check_finite_weights(model, name)
    return model


def check_finite_weights(model: nn.Module, name: str) -> None:
    """Refuse a checkpoint with NaN or infinite weights, naming the model and the first bad tensor (one
    pass over the weights at load time; later it would only show as a non-finite training step)."""
    for param_name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            bad = int((~torch.isfinite(param)).sum())
            raise ValueError(f"model {name!r} has {bad} non-finite (NaN or inf) values in {param_name!r}: the "
                             "checkpoint is corrupt or was saved after a diverged update; use another checkpoint")


def freeze(model: nn.Module) -> nn.Module:
    """Make `model` a frozen function: eval mode, no parameter requires grad."""
    model.eval()
    model.requires_grad_(False)
    return model


def check_tokenizers_compatible(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> None:
    """Refuse a teacher/student pair whose token ids mean different things.

    Token-level distillation compares distributions id by id, so the vocabularies and the special
    tokens must agree exactly. Embedding matrices padded to different sizes are fine (checked later).
    """
    problems = []
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    if s_vocab != t_vocab:
        only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
        only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
        moved = [tok for tok in set(s_vocab) & set(t_vocab) if s_vocab[tok] != t_vocab[tok]][:5]
        problems.append(
            f"vocabularies differ (student {len(s_vocab)} tokens, teacher {len(t_vocab)}; "
            f"only in student: {only_s}, only in teacher: {only_t}, different ids: {moved})"
        )
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
        s, t = getattr(student, attr), getattr(teacher, attr)
        if s != t:
            problems.append(f"{attr} differs (student {s}, teacher {t})")
    if problems:
        raise ValueError(
            "teacher and student tokenizers are incompatible: " + "; ".join(problems)
            + ". Token-level OPD needs one shared tokenizer: pick a teacher and student from the same family."
        )


def check_vocab_sizes(student: PreTrainedModel, teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """The number of logit columns both models share; both must cover the tokenizer."""
    vs = student.get_output_embeddings().weight.shape[0]
    vt = teacher.get_output_embeddings().weight.shape[0]
    if min(vs, vt) < len(tokenizer):
        raise ValueError(
            f"model output sizes (student {vs}, teacher {vt}) are smaller than the tokenizer ({len(tokenizer)} tokens)"
        )
    return min(vs, vt)


def final_hidden_states(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states (after the final norm), (N, L) -> (N, L, H), without full logits.

    The call goes through the model's own (root) forward with `logits_to_keep=1`, so wrappers that hook
    the root module (FSDP2 `fully_shard`, DDP) see a normal forward: they gather the parameters and keep
    the root's output embedding available for the kept-rows head afterwards. A hook on the decoder
    captures its output; the only logits computed are one position per row.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    captured = []
    handle = model.get_decoder().register_forward_hook(lambda mod, args, out: captured.append(out.last_hidden_state))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
              logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1]

# Moved in 0.2.0; the old paths warn and work until 0.3.0.
from opdlab._deprecation import moved_names  # noqa: E402

__getattr__ = moved_names(__name__, {"LogitHead": "opdlab.heads:LogitHead",
                                     "takes_argument": "opdlab.rollout:takes_argument",
                                     "cache_keyword": "opdlab.rollout:cache_keyword"})
