"""FSDP2 (`fully_shard`) wrapping of HF decoder models, used from `OPDModule.configure_model`.

Each decoder layer becomes one sharding unit and the root holds the embeddings, the final norm and
the LM head. FSDP2 keeps the root unsharded after its forward, which is what lets opdlab apply the LM
head to selected rows after `final_hidden_states` (see `opdlab.models`).
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel


def decoder_layers(model: PreTrainedModel) -> list[nn.Module]:
    """The repeated transformer blocks of an HF causal LM (Qwen, Llama, Gemma, Mistral, ...)."""
    decoder = model.get_decoder()
    for name in ("layers", "h", "blocks"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList):
            return list(layers)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}; expected decoder.layers")


def shard_model(model: PreTrainedModel, device_mesh, mixed_precision=None) -> PreTrainedModel:
    """Shard `model` in place over `device_mesh` with FSDP2: one unit per layer plus the root."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": device_mesh} if mixed_precision is None else {"mesh": device_mesh, "mp_policy": mixed_precision}
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
