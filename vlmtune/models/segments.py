"""Attention within each packed sample, without a mask over the whole row.

A packed row of T tokens holds many short samples. SDPA with transformers' block-diagonal mask
computes (and, for backward, keeps) all T x T scores of every row and head, though a token only
ever sees the tokens of its own sample; on the CPU that is most of a packed step's attention time
and memory. Flash-attention's variable-length kernel avoids it on GPUs; this is the same idea for
any device with plain `scaled_dot_product_attention`: the samples are gathered into groups of
similar length (each padded at its end to its group's length), attended causally with no mask,
and scattered back. Padding at a sample's end changes nothing before it, so every real token gets
exactly what the masked row gives it.

The samples are described the way transformers' own packing collator describes them for
flash-attention (`cu_seq_lens_q` / `cu_seq_lens_k`: cumulative lengths over the flattened batch),
so one set of model inputs serves both. Without them (unpacked batches, generation), for
non-causal modules (vision towers) and for anything SDPA-with-a-mask handles that this does not
(sliding windows, caches), it is SDPA exactly as transformers runs it.

`IMPLEMENTATION` is registered with transformers' attention and mask interfaces when this module
is imported; a model switched to it for training keeps saving plain configs (transformers does
not write the attention implementation into config.json)."""

from __future__ import annotations

import inspect

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from vlmtune.models.family import base_model

IMPLEMENTATION = "sdpa_packed"
GROUP = 32  # samples are padded up to a multiple of this many tokens within their group


def segment_kwargs(pack_lengths: torch.Tensor, device: torch.device | None = None) -> dict:
    """Model inputs naming where each packed sample (and each row's padding tail) starts, over
    the flattened [rows x seq] batch: transformers' flash-attention varlen keywords."""
    lengths = [n for row in pack_lengths.tolist() for n in row if n]
    cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    longest = max(lengths)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


_planned: list = []  # the last batch's [cu tensor, plan]: every layer of one forward reuses it


def _groups(cu: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, int]:
    """Per group of samples of similar length: [samples, length] token indices into the flat
    batch (the last token repeated as padding) and the positions of the real ones among its
    flattened [samples x length] tokens; where the real ones go back; and the tokens covered.
    Worked out once per batch, not once per layer (on a GPU each would wait for the device)."""
    if _planned and _planned[0] is cu:
        return _planned[1]
    starts, lengths = cu[:-1].long(), (cu[1:] - cu[:-1]).long()
    rounded = (lengths + GROUP - 1) // GROUP * GROUP
    groups = []
    for size in torch.unique(rounded).tolist():
        chosen = (rounded == size).nonzero().squeeze(1)
        steps = torch.arange(size, device=cu.device)
        n = lengths[chosen, None]
        index, real = starts[chosen, None] + torch.minimum(steps, n - 1), steps < n
        groups.append((index, real.flatten().nonzero().squeeze(1)))
    places = torch.cat([index.flatten()[real] for index, real in groups])
    _planned[:] = [cu, (groups, places, int(cu[-1]))]
    return _planned[1]


def sdpa_packed_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs) -> tuple[torch.Tensor, None]:
    cu = kwargs.get("cu_seq_lens_q")
    batch, heads, seq, dim = query.shape
    if (cu is None or not getattr(module, "is_causal", False) or key.shape[2] != seq or cu.shape[0] < 2
            or kwargs.get("sliding_window") or kwargs.get("softcap") is not None or _groups(cu)[2] != batch * seq):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if key.shape[1] != heads:
        key, value = repeat_kv(key, heads // key.shape[1]), repeat_kv(value, heads // value.shape[1])
    groups, places, _ = _groups(cu)
    # [tokens, heads, dim]: a view for one row; each of query, key and value is gathered from it on its
    # own (stacking them first cost a copy forward and a strided one backward, a third of the time)
    flat = [x.transpose(1, 2).reshape(batch * seq, heads, dim) for x in (query, key, value)]
    pieces = []
    for index, real in groups:
        q, k, v = (x.index_select(0, index.flatten()).view(*index.shape, heads, dim).transpose(1, 2)
                   for x in flat)  # [samples, heads, length, dim] each
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling,
                                                               is_causal=True)
        pieces.append(out.transpose(1, 2).reshape(-1, heads, dim).index_select(0, real))  # [real tokens, heads, dim]
    # every token is one sample's, so the real tokens of all groups fill the batch exactly once
    merged = query.new_zeros(batch * seq, heads, dim).index_copy(0, places, torch.cat(pieces))
    return merged.view(batch, seq, heads, dim), None


AttentionInterface.register(IMPLEMENTATION, sdpa_packed_forward)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def switch_to_segments(model: torch.nn.Module) -> bool:
    """For packed training: a model whose every part runs SDPA runs `IMPLEMENTATION` instead (the
    same numbers, see above). Nothing changes for a model with another implementation chosen
    (eager, flash-attention: it has its own varlen path) or whose forward takes no extra keywords."""
    from transformers import PreTrainedModel

    base = base_model(model)
    parts = [m for m in base.modules() if isinstance(m, PreTrainedModel)]
    takes_keywords = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(base.forward).parameters.values())
    if not parts or not takes_keywords or any(p.config._attn_implementation != "sdpa" for p in parts):
        return False
    base.set_attn_implementation(IMPLEMENTATION)
    return uses_segments(base)


def uses_segments(model: torch.nn.Module) -> bool:
    return getattr(getattr(base_model(model), "config", None), "_attn_implementation", None) == IMPLEMENTATION
