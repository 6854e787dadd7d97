"""Reading weight files others wrote: training checkpoints whose pickles hold more than tensors are
read without importing or running anything; pickles that ask to run code are refused by name."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fixtures import originals as o
from vlmtune.models.weights import ConversionError, load_pickle, read_state_dict


def test_an_mmengine_checkpoint_is_read_without_mmengine(tmp_path):
    path, projector = o.xtuner_iter_pth(tmp_path)
    assert not any(name.startswith("mmengine") for name in sys.modules)
    with pytest.raises(Exception):  # what torch's weights-only loading says about it
        torch.load(path, weights_only=True)
    state = read_state_dict(path)
    assert set(state) == {f"projector.model.{k}" for k in projector}
    assert all(torch.equal(state[f"projector.model.{k}"], v) for k, v in projector.items())
    everything = load_pickle(path)
    history = everything["message_hub"]["log_scalars"]["train/loss"]
    assert type(history).__name__ == "mmengine.logging.history_buffer.HistoryBuffer"  # an inert placeholder
    assert everything["meta"]["iter"] == 500 and everything["optimizer"]["state"][0]["step"].item() == 500
    assert not any(name.startswith("mmengine") for name in sys.modules)


def test_a_legacy_format_file_is_read(tmp_path):
    torch.save({"state_dict": {"w": torch.arange(4.0)}, "meta": {"x": {1, 2}}}, tmp_path / "old.pth",
               _use_new_zipfile_serialization=False)
    assert torch.equal(read_state_dict(tmp_path / "old.pth")["w"], torch.arange(4.0))


class _Calls:
    """A pickled object whose loading would call `func(*args)`."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("name, func", [("posix.system", os.system), ("builtins.eval", eval),
                                        ("subprocess.Popen", subprocess.Popen), ("builtins.getattr", getattr)])
def test_pickles_that_ask_to_run_code_are_refused_by_name(tmp_path, name, func):
    marker = tmp_path / "RAN"
    args = {"posix.system": (f"touch {marker}",), "builtins.eval": (f"open({str(marker)!r}, 'w')",),
            "subprocess.Popen": (["touch", str(marker)],), "builtins.getattr": ("text", "upper")}[name]
    path = tmp_path / "iter_9.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": _Calls(func, *args)}, path)
    with pytest.raises(ConversionError) as err:
        read_state_dict(path)
    assert str(err.value).startswith(f"{path}: refused: the pickle asks to call {name}")
    assert not marker.exists()


def test_deepspeed_folders(tmp_path):
    folder = tmp_path / "iter_7.pth"
    folder.mkdir()
    torch.save({"module": {"projector.model.0.weight": torch.ones(2, 2)}, "ds_version": "0.14.4",
                "param_shapes": [{"projector.model.0.weight": torch.Size([2, 2])}]}, folder / "mp_rank_00_model_states.pt")
    assert torch.equal(read_state_dict(folder)["projector.model.0.weight"], torch.ones(2, 2))
    torch.save({"module": {"projector.model.0.weight": torch.empty(0)}}, folder / "mp_rank_00_model_states.pt")
    with pytest.raises(ConversionError, match="a ZeRO-3 checkpoint.*zero_to_fp32.py"):
        read_state_dict(folder)
