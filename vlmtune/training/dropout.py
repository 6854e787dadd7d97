"""LoRA dropout on the CPU with a random draw per dropped element instead of one per element.

PEFT puts an `nn.Dropout` in front of every LoRA layer. On the CPU, torch draws one number per
element from a serial generator: a fifth of a LoRA step of the benchmark's LLaVA (28 layers, rows
of 768 tokens) went to `bernoulli_`. Drop indicators that are independent with probability p are
the same thing as gaps between dropped positions that are independent and geometric with
parameter p, so `dropped_positions` draws only the gaps, about p x n numbers for n elements: the
same distribution, not an approximation. The forward pass scales the kept elements by 1 / (1 - p),
as `nn.Dropout` does, and backward zeroes the same positions of the gradient; what autograd keeps
is the positions (p x 8 bytes an element) instead of a float mask. Forward + backward of a
[1, 768, 1024] input at p = 0.05: 5.6-6.3 ms with `nn.Dropout`, 1.0 ms by the gaps. On other devices,
in eval mode and for p outside (0, 0.5], the module is `nn.Dropout`'s own forward: an accelerator's
generator is not the bottleneck, and for large p the gaps save little.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

FASTEST_UP_TO = 0.5  # the gaps get nearly as many as the elements: the two cost the same near p = 0.75


def dropped_positions(numel: int, p: float) -> torch.Tensor:
    """Flat indices in [0, numel) where each index is in, independently, with probability p.

    The gap from one dropped position to the next (from -1 to the first) is geometric on {1, 2, ...}:
    floor(log(1 - u) / log(1 - p)) + 1 for u uniform in [0, 1). Draws come from torch's default
    generator, so a seeded run repeats its masks."""
    if numel == 0:
        return torch.zeros(0, dtype=torch.long)
    expected = numel * p
    chunk = int(expected + 6 * math.sqrt(expected) + 16)  # rarely too few: then another chunk
    scale = 1.0 / math.log1p(-p)
    ends: list[torch.Tensor] = []
    last = -1.0
    while last < numel - 1:
        gaps = torch.rand(chunk, dtype=torch.float64).neg_().log1p_().mul_(scale).floor_().add_(1)
        positions = gaps.cumsum_(0).add_(last)
        ends.append(positions)
        last = float(positions[-1])
    positions = torch.cat(ends) if len(ends) > 1 else ends[0]
    inside = int(torch.searchsorted(positions, torch.tensor(float(numel), dtype=torch.float64)))  # ascending
    return positions[:inside].long()


class _Dropped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        positions = dropped_positions(x.numel(), p)
        out = x.contiguous() * (1.0 / (1.0 - p))
        out.view(-1).index_fill_(0, positions, 0)
        ctx.save_for_backward(positions)
        ctx.p = p
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (positions,) = ctx.saved_tensors
        grad_x = grad.contiguous() * (1.0 / (1.0 - ctx.p))
        grad_x.view(-1).index_fill_(0, positions, 0)
        return grad_x, None


class GapDropout(nn.Dropout):
    """`nn.Dropout` whose CPU training pass draws the dropped positions by their gaps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu" or not 0 < self.p <= FASTEST_UP_TO or self.inplace:
            return super().forward(x)
        return _Dropped.apply(x, self.p)


@contextlib.contextmanager
def gap_dropout(model: nn.Module):
    """PEFT's LoRA dropout modules (`lora_dropout`, one per adapter of every LoRA layer) as
    `GapDropout` while the block runs, put back afterwards; yields how many were swapped."""
    swapped: list[tuple[nn.ModuleDict, str, nn.Dropout]] = []
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is nn.Dropout:
                swapped.append((dropouts, name, dropout))
                dropouts[name] = GapDropout(dropout.p, dropout.inplace).train(dropout.training)
    try:
        yield len(swapped)
    finally:
        for dropouts, name, dropout in swapped:
            dropout.train(dropouts[name].training)
            dropouts[name] = dropout
