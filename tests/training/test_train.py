"""Training end to end: loss falls, each tuning mode changes exactly its components, and every output
folder loads with plain transformers / peft."""

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmtune.checkpoints.load import load_model
from vlmtune.config import load_config
from vlmtune.training import run
from vlmtune.training.run import train
from vlmtune.tuning.plan import TuningPlan
from vlmtune.models.llava import LLAVA

PREFIXES = {"vision": "model.vision_tower.", "projector": "model.multi_modal_projector.", "llm": "model.language_model."}


def config(model, data, out, **tune):
    tree = {"model": {"path": str(model)}, "data": {"train": str(data), "max_length": 64},
            "tune": tune, "train": {"max_steps": 6, "batch_size": 4, "lr": 5e-3, "logging_steps": 2, "save_steps": 3,
                                    "warmup_ratio": 0.0},
            "output": {"dir": str(out)}}
    return load_config(tree=tree)


def changed_components(before: dict, after: dict) -> set[str]:
    changed = set()
    for name, tensor in after.items():
        if not torch.equal(tensor, before[name]):
            changed |= {c for c, prefix in PREFIXES.items() if name.startswith(prefix)}
    return changed


def test_loss_falls_and_logs(tiny_vlm, color_data, tmp_path):
    cfg = config(tiny_vlm, color_data, tmp_path / "run", vision="full", projector="full", llm="full")
    cfg.train.max_steps, cfg.train.save_steps = 30, 0
    result = train(cfg)
    assert result.final_loss < 0.5 * result.first_loss
    records = [json.loads(line) for line in (tmp_path / "run" / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(2, 31, 2))
    assert all({"step", "loss", "learning_rate"} <= set(r) for r in records)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


FULL_MODES = [("full", "frozen", "frozen"), ("frozen", "full", "frozen"), ("frozen", "full", "full"), ("full", "full", "full")]
LORA_MODES = [("frozen", "frozen", "lora"), ("lora", "full", "lora"), ("lora", "lora", "lora"), ("full", "frozen", "lora"),
              ("lora", "frozen", "frozen")]


@pytest.mark.parametrize("vision,projector,llm", FULL_MODES)
def test_full_modes_load_with_plain_transformers(tiny_vlm, color_data, tmp_path, vision, projector, llm):
    out = tmp_path / "run"
    train(config(tiny_vlm, color_data, out, vision=vision, projector=projector, llm=llm))
    expected = {c for c, mode in zip(PREFIXES, (vision, projector, llm)) if mode != "frozen"}
    base = AutoModelForImageTextToText.from_pretrained(tiny_vlm).state_dict()
    for folder in (out, out / "checkpoint-3"):
        processor = AutoProcessor.from_pretrained(folder)
        model = AutoModelForImageTextToText.from_pretrained(folder)
        assert processor.chat_template and processor.tokenizer.pad_token_id is not None
        assert changed_components(base, model.state_dict()) == expected
    assert {"config.json", "model.safetensors", "generation_config.json", "processor_config.json", "tokenizer.json",
            "chat_template.jinja", "vlmtune.json", "trainer_log.jsonl"} <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize("vision,projector,llm", LORA_MODES)
def test_lora_modes_load_with_peft(tiny_vlm, color_data, tmp_path, vision, projector, llm):
    out = tmp_path / "run"
    train(config(tiny_vlm, color_data, out, vision=vision, projector=projector, llm=llm))
    expected = {c for c, mode in zip(PREFIXES, (vision, projector, llm)) if mode != "frozen"}
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_vlm.resolve())
    base = AutoModelForImageTextToText.from_pretrained(tiny_vlm)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, out).merge_and_unload()
    assert changed_components(before, merged.state_dict()) == expected
    processor = AutoProcessor.from_pretrained(out)
    assert processor.chat_template and (out / "generation_config.json").is_file()


def test_plan_groups_use_component_rates(tiny_vlm):
    cfg = load_config(tree={"model": {"path": "m"}, "data": {"train": "t"}, "output": {"dir": "o"},
                            "tune": {"vision": "lora", "projector": "full", "llm": "full",
                                     "lr": {"vision": 1e-5, "projector": 2e-4}}, "train": {"lr": 3e-3}})
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm)
    plan = TuningPlan(cfg.tune, LLAVA, cfg.train.lr)
    wrapped = plan.apply(model)
    rates = {g["name"]: g["lr"] for g in plan.param_groups(wrapped, weight_decay=0.1)}
    assert rates == {"vision": 1e-5, "projector": 2e-4, "llm": 3e-3}
    rows = {r.name: r for r in plan.rows(wrapped)}
    assert rows["projector"].trainable == rows["projector"].total > 0
    assert 0 < rows["vision"].trainable < rows["vision"].total
    assert rows["llm"].trainable == rows["llm"].total
    lora_layers = [n for n, _ in wrapped.named_modules() if n.endswith("lora_A")]
    assert lora_layers and all(".vision_tower." in n for n in lora_layers)


def test_gradient_checkpointing_and_bf16_on_cpu(tiny_vlm, color_data, tmp_path):
    cfg = config(tiny_vlm, color_data, tmp_path / "run", vision="lora", projector="full", llm="lora")
    cfg.train.gradient_checkpointing, cfg.train.precision, cfg.train.save_steps = True, "bf16", 0
    result = train(cfg)
    assert result.steps == 6 and torch.isfinite(torch.tensor(result.final_loss))
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_mixed_text_only_data_and_eval_during_training(tiny_vlm, tmp_path):
    from conftest import color_records, write_jsonl

    records = color_records(tmp_path, n=12)
    records += [{"id": f"t{i}", "messages": [{"role": "user", "content": "Say yes."},
                                            {"role": "assistant", "content": "yes"}]} for i in range(6)]
    train_file = write_jsonl(tmp_path / "train.jsonl", records)
    eval_file = write_jsonl(tmp_path / "eval.jsonl", records[:4] + records[-2:])
    cfg = config(tiny_vlm, train_file, tmp_path / "run", vision="full", projector="full", llm="full")
    cfg.data.eval, cfg.train.eval_steps, cfg.train.batch_size = [str(eval_file)], 3, 6
    train(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "trainer_log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]  # every eval_steps; the final weights were evaluated at step 6
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]


def test_final_eval_runs_when_the_last_step_was_not_evaluated(tiny_vlm, color_data, tmp_path):
    cfg = config(tiny_vlm, color_data, tmp_path / "run", vision="frozen", projector="full", llm="frozen")
    cfg.data.eval, cfg.train.eval_steps, cfg.train.max_steps = [str(color_data)], 4, 6
    train(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval_loss" in r] == [4, 6]


def test_each_component_rate_is_logged_and_printed_with_the_step(tiny_vlm, color_data, tmp_path, capsys):
    cfg = config(tiny_vlm, color_data, tmp_path / "run", vision="frozen", projector="full", llm="full",
                 lr={"projector": 1e-3})
    cfg.train.lr, cfg.train.lr_scheduler, cfg.train.save_steps, cfg.train.max_steps = 1e-4, "constant", 0, 4
    train(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "trainer_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["learning_rate/projector"], r["learning_rate/llm"]) for r in log] == [(2, 1e-3, 1e-4), (4, 1e-3, 1e-4)]
    printed = capsys.readouterr()
    lines = [line for line in (printed.out + printed.err).splitlines() if line.startswith("step ")]
    assert [line.split("  loss ")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert all("  lr projector 1.00e-03 llm 1.00e-04  grad norm " in line for line in lines)
    assert not any(line.lstrip().startswith("{'loss'") for line in (printed.out + printed.err).splitlines())


def test_summary_when_no_step_was_logged(tiny_vlm, color_data, tmp_path, capsys):
    cfg = config(tiny_vlm, color_data, tmp_path / "run", vision="frozen", projector="full", llm="frozen")
    cfg.train.max_steps, cfg.train.logging_steps, cfg.train.save_steps = 2, 10, 0
    train(cfg)
    summary = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("saved and verified"))
    assert "nan" not in summary and summary.endswith(
        "mean loss " + summary.split("mean loss ")[1].split()[0] + " (no step was logged: train.logging_steps=10 is "
        "more than the steps run)")
    assert float(summary.split("mean loss ")[1].split()[0]) > 0


def test_planned_steps_count_as_the_trainer_does(tiny_vlm, color_data, tmp_path):
    from vlmtune.training.run import planned_steps

    cfg = config(tiny_vlm, color_data, tmp_path / "run", vision="frozen", projector="full", llm="frozen")
    cfg.train.max_steps, cfg.train.epochs, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.save_steps = None, 1.5, 5, 2, 0
    assert train(cfg).steps == planned_steps(cfg, 24) == 5  # 5 batches -> 3 updates per epoch, 1.5 epochs


def test_the_optimizer_is_torchs_fused_adamw_over_the_component_groups(tiny_vlm, color_data, tmp_path, monkeypatch):
    from vlmtune.training.trainer import VlmTrainer

    built = []
    original = VlmTrainer.create_optimizer

    def recording(self, model=None):
        built.append(original(self, model))
        return built[-1]

    steps, at_save = [], []
    original_release, original_save = run.release_training_state, run.save_model_folder

    def release(trainer):  # the state as training left it, then as the final save sees it
        steps.extend(int(trainer.optimizer.state[p]["step"]) for g in trainer.optimizer.param_groups for p in g["params"])
        original_release(trainer)
        at_save.append((len(trainer.optimizer.state), [p.grad for p in trainer.model.parameters()]))

    def save(model, *args, **kwargs):
        at_save.append({k: v.clone() for k, v in model.state_dict().items()})
        return original_save(model, *args, **kwargs)

    monkeypatch.setattr(VlmTrainer, "create_optimizer", recording)
    monkeypatch.setattr(run, "release_training_state", release)
    monkeypatch.setattr(run, "save_model_folder", save)
    cfg = config(tiny_vlm, color_data, tmp_path / "run", vision="frozen", projector="full", llm="full",
                 lr={"projector": 1e-3})
    cfg.train.lr, cfg.train.lr_scheduler, cfg.train.save_steps, cfg.train.max_steps = 1e-4, "constant", 0, 2
    train(cfg)
    optimizer = built[-1]
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"] is True
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8
    assert sorted((g["name"], g["lr"]) for g in optimizer.param_groups) == [("llm", 1e-4), ("projector", 1e-3)]
    assert steps and all(step == 2 for step in steps)
    # the moments and gradients are freed before the final save (its peak of memory), and the
    # weights saved are the trained ones
    (state_left, grads), weights = at_save
    assert state_left == 0 and all(g is None for g in grads)
    saved = load_model(tmp_path / "run").model.state_dict()
    assert all(torch.equal(saved[k], weights[k]) for k in weights)


def test_training_runs_with_the_objects_made_before_it_frozen_for_the_collector(tiny_vlm, color_data, tmp_path,
                                                                                   monkeypatch):
    import gc

    from vlmtune.training.trainer import VlmTrainer

    frozen, original = [], VlmTrainer.training_step

    def step(self, *args, **kwargs):
        frozen.append(gc.get_freeze_count())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VlmTrainer, "training_step", step)
    cfg = config(tiny_vlm, color_data, tmp_path / "run", vision="frozen", projector="full", llm="frozen")
    cfg.train.max_steps, cfg.train.save_steps = 2, 0
    before = gc.get_freeze_count()
    train(cfg)
    # the model, torch's and transformers' objects are left out of every collection during the steps
    assert len(frozen) == 2 and all(count > before + 10_000 for count in frozen)
    assert gc.get_freeze_count() == before  # and collectable again afterwards


TRIMMED = """
import os, torch
from vlmtune.training.housekeeping import give_back_freed_memory
def resident(): return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
blocks = [torch.ones(16384) for _ in range(3200)]  # 64 KiB each: heap blocks, under glibc's mmap threshold
kept = blocks[::10]  # every tenth stays alive, so the freed ones are holes the heap's top cannot shed
del blocks
held = resident()
print(give_back_freed_memory(), held - resident())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim; /proc/self/statm")
def test_memory_freed_after_training_leaves_the_resident_set():
    """What `release_training_state` frees (moments, gradients) left the resident set only with
    `give_back_freed_memory`: 180 MiB freed in 64 KiB blocks stay resident until it runs."""
    done = subprocess.run([sys.executable, "-c", TRIMMED], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    trimmed, released_mib = done.stdout.split()
    assert trimmed == "True"
    assert float(released_mib) > 120  # of the 180 MiB freed
