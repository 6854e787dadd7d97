"""Inference goes to the GPU when there is one; a device that is not there is refused before loading."""

import pytest
import torch

from vlmtune.cli import main
from vlmtune.config import ConfigError
from vlmtune.models.device import inference_device, model_device, place


def test_auto_picks_the_gpu_when_there_is_one(monkeypatch):
    assert inference_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert inference_device("auto") == torch.device("cuda")
    assert inference_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_missing_or_unknown_device_is_refused():
    with pytest.raises(ConfigError, match="--device cuda:1: no CUDA GPU is available here; use --device cpu"):
        inference_device("cuda:1")
    with pytest.raises(ConfigError, match="--device gpu: not a device; use auto, cpu, cuda or cuda:N"):
        inference_device("gpu")


def test_place_moves_a_plain_model_and_leaves_a_dispatched_one():
    plain = torch.nn.Embedding(4, 2).train()
    plain.get_input_embeddings = lambda: plain
    assert place(plain, "cpu") is plain and not plain.training and model_device(plain) == torch.device("cpu")
    dispatched = torch.nn.Linear(2, 2)
    dispatched.hf_device_map = {"": "meta"}  # a device_map load: accelerate's hooks own placement
    dispatched.to = lambda *a, **k: pytest.fail("a dispatched model must not be moved")
    assert place(dispatched, "cpu") is dispatched


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("command", ["eval", "generate"])
def test_cli_refuses_a_missing_gpu_before_loading(tmp_path, capsys, command):
    extra = ["--out", str(tmp_path / "p.jsonl")]
    code = main([command, str(tmp_path / "no-model"), "--data", str(tmp_path / "d.jsonl"), "--device", "cuda", *extra])
    assert code == 2
    assert "error: --device cuda: no CUDA GPU is available here" in capsys.readouterr().out
