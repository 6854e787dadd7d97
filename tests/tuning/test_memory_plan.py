"""`vlmtune plan`: exact parameter, gradient and optimizer bytes per component from a model folder's config
alone, sharding divided by process count, a verdict and suggestions, and clear errors."""

import json

import pytest
import yaml

from vlmtune.checkpoints.load import load_model
from vlmtune.cli import main
from vlmtune.config import ConfigError, load_config
from vlmtune.tuning.memory import estimate, parse_size
from vlmtune.tuning.plan import TuningPlan

TUNE = {"vision": "frozen", "projector": "full", "llm": "lora"}


def config(model_dir, tune=TUNE, **train):
    return load_config(tree={"model": {"path": str(model_dir)}, "data": {"train": "t.jsonl", "max_length": 64},
                             "tune": tune, "train": {"batch_size": 2, "precision": "fp32", **train},
                             "output": {"dir": "o"}})


def test_counts_and_bytes_equal_the_real_model(tiny_vlm):
    cfg = config(tiny_vlm)
    result = estimate(cfg)
    loaded = load_model(tiny_vlm)
    plan = TuningPlan(cfg.tune, loaded.family, 1e-3)
    model = plan.apply(loaded.model)
    real = {row.name: row for row in plan.rows(model)}
    for row in result.rows:
        assert (row.params, row.trainable) == (real[row.component].total, real[row.component].trainable)
        frozen = row.params - row.trainable
        assert row.weights == 4 * (frozen + row.trainable)  # fp32 weights
        assert row.grads == 4 * row.trainable and row.optimizer == 8 * row.trainable  # AdamW: two fp32 states
    assert result.rows[0].activations == 0  # a frozen tower keeps nothing for the backward pass
    assert next(r for r in result.rows if r.component == "llm").activations > 0


def test_sharding_divides_by_the_process_count(tiny_vlm):
    one = estimate(config(tiny_vlm))
    zero3 = estimate(config(tiny_vlm, distributed={"strategy": "deepspeed", "zero_stage": 3}), nproc=4)
    zero2 = estimate(config(tiny_vlm, distributed={"strategy": "deepspeed", "zero_stage": 2}), nproc=4)
    ddp = estimate(config(tiny_vlm), nproc=4)
    for a, z2, z3, d in zip(one.rows, zero2.rows, zero3.rows, ddp.rows):
        assert z2.grads == pytest.approx(a.grads / 4) and z3.weights < a.weights and z2.weights >= a.weights
        assert d.grads == a.grads and d.weights == a.weights
    assert ddp.extra["DDP gradient buckets"] == pytest.approx(sum(r.grads for r in ddp.rows))
    offload = estimate(config(tiny_vlm, distributed={"strategy": "deepspeed", "zero_stage": 3, "offload_optimizer": True,
                                                     "offload_params": True}), nproc=4)
    assert all(r.optimizer == 0 and r.weights == 0 for r in offload.rows) and offload.offloaded > 0


def every_vision_layer_used(model_dir, folder):
    """A config-only copy of the model whose LLM gets the vision tower's last hidden state."""
    config = json.loads((model_dir / "config.json").read_text())
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, "vision_feature_layer": -1}))
    return folder


def test_checkpointing_keeps_fewer_activations(tiny_vlm, tmp_path):
    plain, checkpointed = estimate(config(tiny_vlm)), estimate(config(tiny_vlm, gradient_checkpointing=True))
    llm = lambda e: next(r for r in e.rows if r.component == "llm").activations  # noqa: E731
    assert llm(checkpointed) < llm(plain)
    # per component: [llm] keeps the LLM's activations like true and the vision tower's like false
    full = {"vision": "full", "projector": "full", "llm": "full"}
    act = lambda e, c: next(r for r in e.rows if r.component == c).activations  # noqa: E731
    whole = every_vision_layer_used(tiny_vlm, tmp_path / "whole")  # two layers run: checkpointing saves
    plain, every, llm_only = (estimate(config(whole, full, gradient_checkpointing=g)) for g in (False, True, ["llm"]))
    assert act(llm_only, "llm") == act(every, "llm") < act(plain, "llm")
    assert act(llm_only, "vision") == act(plain, "vision") > act(every, "vision")


def test_vision_layers_training_skips_keep_no_activations(tiny_vlm, tmp_path):
    """The tiny LLaVA's LLM gets hidden state -2 of its 2-layer tower: training runs one layer."""
    full = {"vision": "full", "projector": "full", "llm": "full"}
    act = lambda e: next(r for r in e.rows if r.component == "vision").activations  # noqa: E731
    whole = every_vision_layer_used(tiny_vlm, tmp_path / "whole")
    assert act(estimate(config(tiny_vlm, full))) == act(estimate(config(whole, full))) / 2 > 0


def test_cli_reads_only_the_config_and_gives_a_verdict_with_suggestions(tiny_vlm, tmp_path, capsys):
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_vlm / "config.json").read_text())  # no weights at all
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"model": {"path": str(folder)}, "data": {"train": "t.jsonl", "max_length": 4096},
                                   "tune": {"vision": "full", "projector": "full", "llm": "full"},
                                   "train": {"batch_size": 8, "precision": "fp32"}, "output": {"dir": "o"}}))
    assert main(["plan", str(run), "--gpu-mem", "10MiB"]) == 3
    out = capsys.readouterr().out
    assert "does not fit" in out and "train.gradient_checkpointing=true" in out and "tune.llm=lora" in out
    assert main(["plan", str(run), "--gpu-mem", "80GiB"]) == 0
    assert "fits" in capsys.readouterr().out
    assert main(["plan", str(run), "--gpu-mem", "lots"]) == 2
    assert "--gpu-mem 'lots': expected a size such as 24GiB" in capsys.readouterr().out


def test_sizes_parse_in_binary_units():
    assert parse_size("24GiB") == 24 * 2**30 and parse_size("512 mb") == 512 * 2**20 and parse_size("1.5g") == 3 * 2**29
    with pytest.raises(ConfigError):
        parse_size("-3GB")


def test_a_config_without_a_model_folder_is_refused():
    cfg = load_config(tree={"model": {"vision": "v", "llm": "l"}, "data": {"train": "t.jsonl"}, "output": {"dir": "o"}})
    with pytest.raises(ConfigError, match="reads the model from `model.path`"):
        estimate(cfg)
