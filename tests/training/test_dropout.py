"""LoRA dropout drawn by gaps: the same Bernoulli masks as `nn.Dropout`, the same scaling and gradient."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from vlmtune.training.dropout import GapDropout, dropped_positions, gap_dropout


def test_positions_are_sorted_unique_and_inside():
    torch.manual_seed(0)
    for numel, p in [(0, 0.1), (1, 0.5), (7, 0.05), (1000, 0.3), (196_608, 0.05)]:
        positions = dropped_positions(numel, p)
        assert positions.dtype == torch.long
        assert positions.numel() == 0 or (positions.min() >= 0 and positions.max() < numel)
        assert torch.equal(positions, positions.unique())  # sorted, no repeats


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_each_position_is_dropped_with_probability_p_independently(p):
    """Over many masks of 12 elements: every position (the first and the last too) is dropped at rate
    p, neighbours together at p^2, and the number dropped follows Binomial(12, p)."""
    torch.manual_seed(1)
    trials, numel = 20_000, 12
    masks = torch.zeros(trials, numel)
    for t in range(trials):
        masks[t, dropped_positions(numel, p)] = 1
    rate = masks.mean(0)
    sigma = math.sqrt(p * (1 - p) / trials)
    assert (rate - p).abs().max() < 5 * sigma, rate
    both = (masks[:, :-1] * masks[:, 1:]).mean(0)
    assert (both - p * p).abs().max() < 5 * math.sqrt(p * p * (1 - p * p) / trials), both
    counts = torch.bincount(masks.sum(1).long(), minlength=numel + 1).double() / trials
    binomial = torch.tensor([math.comb(numel, k) * p**k * (1 - p) ** (numel - k) for k in range(numel + 1)])
    assert (counts - binomial).abs().max() < 5 * math.sqrt(0.25 / trials), (counts, binomial)


def test_a_large_input_drops_p_of_its_elements():
    torch.manual_seed(2)
    numel, p = 2_000_000, 0.05
    dropped = dropped_positions(numel, p).numel()
    assert abs(dropped - numel * p) < 5 * math.sqrt(numel * p * (1 - p))


def test_forward_scales_the_kept_and_backward_zeroes_the_same_positions():
    torch.manual_seed(3)
    x = (torch.rand(3, 50, 40) + 0.5).requires_grad_()  # no zero in x: a zero out is a dropped element
    layer = GapDropout(0.3).train()
    out = layer(x)
    dropped = out == 0
    assert 0.2 < dropped.float().mean() < 0.4
    assert layer(torch.zeros(0, 8)).shape == (0, 8)  # an empty input: nothing to drop
    assert torch.equal(out[~dropped], x.detach()[~dropped] * (1 / 0.7))
    grad = torch.randn_like(x)
    out.backward(grad)
    assert torch.equal(x.grad[dropped], torch.zeros(int(dropped.sum())))
    assert torch.equal(x.grad[~dropped], grad[~dropped] * (1 / 0.7))
    # seeded: the same mask again; a strided input is handled as its contiguous copy
    torch.manual_seed(3)
    torch.rand(3, 50, 40)
    again = layer(x.detach().transpose(1, 2).contiguous().transpose(1, 2))
    assert torch.equal(again == 0, dropped)


def test_falls_back_to_nn_dropout_where_the_gaps_do_not_pay():
    x = torch.randn(4, 64)
    assert torch.equal(GapDropout(0.1).eval()(x), x)  # eval: no dropout at all
    for p, inplace in [(0.7, False), (0.1, True)]:
        torch.manual_seed(4)
        expected = nn.Dropout(p)(x.clone())
        torch.manual_seed(4)
        assert torch.equal(GapDropout(p, inplace).train()(x.clone()), expected)


def test_peft_lora_dropout_is_swapped_while_the_block_runs_and_put_back():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(5)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["a", "b"]))
    model.train()
    originals = {n: m for n, m in model.named_modules() if type(m) is nn.Dropout}
    keys = set(model.state_dict())
    assert len(originals) == 2
    with gap_dropout(model) as swapped:
        assert swapped == 2
        inside = {n: m for n, m in model.named_modules() if n in originals}
        assert all(type(m) is GapDropout and m.p == 0.1 and m.training for m in inside.values())
        assert set(model.state_dict()) == keys  # a dropout holds no state: what saves is unchanged
        model(torch.randn(8, 16)).sum().backward()
        assert model.base_model.model.a.lora_A["default"].weight.grad is not None
    assert {n: m for n, m in model.named_modules() if n in originals} == originals
    with gap_dropout(get_peft_model(Net(), LoraConfig(r=4, target_modules=["a"], lora_dropout=0.0))) as swapped:
        assert swapped == 0  # no dropout: PEFT put an identity there


def test_a_lora_run_on_the_cpu_trains_with_gap_dropout_and_saves_peft_s_own(tiny_vlm, color_data, tmp_path, capsys):
    import json

    from vlmtune.config import load_config
    from vlmtune.training.run import train

    out = tmp_path / "run"
    cfg = load_config(tree={"model": {"path": str(tiny_vlm)}, "data": {"train": str(color_data), "max_length": 64},
                            "tune": {"vision": "frozen", "projector": "full", "llm": "lora",
                                     "lora": {"dropout": 0.1}},
                            "train": {"max_steps": 12, "batch_size": 4, "lr": 1e-2, "save_steps": 0, "warmup_ratio": 0.0,
                                      "logging_steps": 2},
                            "output": {"dir": str(out)}})
    result = train(cfg)
    assert result.final_loss < result.first_loss
    printed = capsys.readouterr().out
    assert "LoRA dropout on the CPU: the dropped positions of " in printed and "drawn by their gaps" in printed
    assert json.loads((out / "adapter_config.json").read_text())["lora_dropout"] == 0.1
