"""The LLM's last MLP run only at the positions whose logits the loss uses, while training.

Training computes logits only where the next token has a label (`logits_to_keep`, a [batch, seq]
mask). The last decoder layer's MLP works position by position, and its output at any other position
reaches nothing: not a logit, not another position (attention comes before it in the layer, and
there is no layer after it). So its MLP, three quarters of a Llama layer's matrix work, runs on the
kept positions only, and the others get zeros (their hidden states go on to the final norm and stop
there: finite, unused, no gradient). Loss and every gradient are those of the whole layer, and the
module tree, its keys and the saved weights are untouched; the MLP's own forward is back when
training ends. On the benchmark's data a third of the positions have a label.

Applies where the model's decoder (`get_decoder()`) has its `num_hidden_layers` layers in `layers`,
the last one with a position-wise `mlp` (not a mixture of experts, whose router statistics span every
position); elsewhere, and in any call whose hidden states do not match the mask, the MLP runs whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from vlmtune.models.family import base_model
from vlmtune.models.skipped import forwards_replaced


class KeptPositions:
    """The current step's `logits_to_keep` mask, set by the trainer before each forward (and kept through
    its backward, where checkpointing recomputes the layer); None runs the MLP whole."""

    mask: torch.Tensor | None = None


def last_mlp(model: nn.Module) -> str | None:
    """Module path (under the transformers model) of the decoder's last MLP, where it is position-wise."""
    base = base_model(model)
    try:
        decoder = base.get_decoder()
    except (AttributeError, ValueError, NotImplementedError):
        return None
    config = getattr(base.config, "get_text_config", lambda: base.config)()
    layers = getattr(decoder, "layers", None)
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, nn.ModuleList) or not count or len(layers) != count:
        return None
    mlp = getattr(layers[-1], "mlp", None)
    if not isinstance(mlp, nn.Module) or any(hasattr(mlp, a) for a in ("experts", "router", "gate_up_proj_experts")):
        return None
    path = {id(m): n for n, m in base.named_modules()}.get(id(mlp))
    return path or None


def _on_kept(original, kept: KeptPositions):
    def forward(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        mask = kept.mask
        if mask is None or hidden_states.shape[:-1] != mask.shape or args or kwargs:
            return original(hidden_states, *args, **kwargs)
        rows = mask.reshape(-1).nonzero().squeeze(1).to(hidden_states.device)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        out = original(flat.index_select(0, rows).unsqueeze(0)).squeeze(0)
        whole = out.new_zeros(flat.shape[0], out.shape[-1]).index_copy(0, rows, out)
        return whole.reshape(*hidden_states.shape[:-1], out.shape[-1])

    return forward


@contextlib.contextmanager
def kept_positions_only(model: nn.Module, name: str | None) -> Iterator[KeptPositions | None]:
    """Within the block the MLP at `name` (`last_mlp`) runs where `KeptPositions.mask` says; yields the
    holder the trainer sets (None when there is no such MLP). Its own forward is back afterwards
    (`forwards_replaced`)."""
    if name is None:
        yield None
        return
    kept = KeptPositions()
    with forwards_replaced([base_model(model).get_submodule(name)], lambda original: _on_kept(original, kept)):
        yield kept
