"""Exporting the trained student: a plain Hugging Face checkpoint with its tokenizer, or for a LoRA student the
adapter in peft's format (and, when asked, the merged model beside it). Refuses non-finite weights on every rank
together; gathers sharded weights (a collective: call on every rank); files readable as any new file here.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from opdlab.adapters import AdapterOptions, adapter_state, is_adapted, merged_copy, save_adapter
from opdlab.console import OpdlabError
from opdlab.distributed import all_reduce_sum, rank
from opdlab.sharding import is_sharded


def export_student(student, tokenizer, path: str, base: str, adapter: AdapterOptions, device: torch.device) -> None:
    """Save `student` (trained from `base`) to `path`. Call on every rank; rank 0 writes."""
    bad = non_finite_parameters(student)  # this rank's weights (its shards under FSDP), before any gather
    if int(all_reduce_sum(torch.tensor(float(len(bad)), device=device))):  # every rank refuses together
        raise OpdlabError(f"the trained student's weights hold NaN or inf{f' in {len(bad)} tensor(s) (e.g. {bad[0]})' if bad else ''}; "
                          f"it was not exported to {path}. Check the loss curve and train/grad_norm; the "
                          "checkpoints saved during training are kept (resume from an earlier one with --ckpt_path)")
    if is_adapted(student):
        export_adapter(student, tokenizer, path, base, adapter.export_merged)
        return
    state_dict = None
    if is_sharded(student):  # gather the full weights (a collective: every rank takes part)
        state_dict = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() == 0:
        student.save_pretrained(path, state_dict=state_dict)
        tokenizer.save_pretrained(path)
        readable_by_default(path)


def export_adapter(student, tokenizer, path: str, base: str, merged: bool) -> None:
    """An adapted student's export: the adapter in peft's format (its base recorded as `base`) with the tokenizer,
    and with `merged` the merged plain model in `<path>/merged`."""
    state = adapter_state(student)  # gathered on every rank (collectives) before rank 0 writes
    model = merged_copy(student) if merged else None
    if rank() == 0:
        save_adapter(student, path, base, state)
        tokenizer.save_pretrained(path)
        readable_by_default(path)
        if model is not None:
            model.save_pretrained(f"{path}/merged")
            tokenizer.save_pretrained(f"{path}/merged")
            readable_by_default(f"{path}/merged")


def non_finite_parameters(model: torch.nn.Module) -> list[str]:
    """The names of floating-point parameters holding NaN or inf (local shards of sharded ones)."""
    bad = []
    for name, weight in model.named_parameters():
        local = weight.to_local() if hasattr(weight, "to_local") else weight
        if local.is_floating_point() and local.numel() and not bool(torch.isfinite(local.detach()).all()):
            bad.append(name)
    return bad


def new_file_mode(folder: str | Path) -> int:
    """The permissions a new file gets in `folder` (0o666 less the umask), read off a file created there: the
    umask itself can only be read by setting it, which would change it for every thread of the process."""
    probe = Path(folder) / f".opdlab-mode-{os.getpid()}-{threading.get_ident()}"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        os.close(fd)
        return probe.stat().st_mode & 0o777
    finally:
        probe.unlink(missing_ok=True)


def readable_by_default(folder: str) -> None:
    """Give the files of an exported checkpoint the permissions a new file gets here: transformers writes the
    weights through a private temporary file (mode 0600), so other users and jobs could not read them."""
    mode = new_file_mode(folder)
    for file in Path(folder).iterdir():
        if file.is_file():
            file.chmod(mode)
