"""Mini-Gemini: aux towers from every folder kind equal an independent ConvNeXt; stage 1 builds from
parts (ViT + OpenCLIP ConvNeXt + LLM) and trains mining + projector; stage 2 adds a LoRA LLM and
merges; stage 3 continues with tower blocks; every folder carries its code, and plain transformers /
PEFT load them in a process where vlmtune cannot be imported, with vlmtune's logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_image, write_jsonl
from PIL import Image
from safetensors.torch import save_file
from transformers import ConvNextConfig, ConvNextModel

from families.mgm_reference import convnext_stages
from vlmtune.checkpoints.load import load_model
from vlmtune.config import load_config
from vlmtune.models.mgm.towers import TowerError, load_aux_tower
from vlmtune.training.run import train

WIDTHS, DEPTHS = [8, 16, 16, 32], [1, 2, 1, 1]
CODE = {"configuration_mgm.py", "modeling_mgm.py", "processing_mgm.py"}
FULL_FILES = {"config.json", "generation_config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
              "tokenizer_config.json", "chat_template.jinja", "vlmtune.json", "trainer_log.jsonl", "loss.png"} | CODE


def timm_convnext_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under timm's ConvNeXt names (shapes from the architecture, not from vlmtune)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    s = {"stem.0.weight": r(WIDTHS[0], 3, 4, 4), "stem.0.bias": r(WIDTHS[0]),
         "stem.1.weight": 1 + r(WIDTHS[0]), "stem.1.bias": r(WIDTHS[0]),
         "head.norm.weight": 1 + r(WIDTHS[-1]), "head.norm.bias": r(WIDTHS[-1]), "head.fc.weight": r(10, WIDTHS[-1])}
    for i, (c, depth) in enumerate(zip(WIDTHS, DEPTHS)):
        if i:
            prev = WIDTHS[i - 1]
            s |= {f"stages.{i}.downsample.0.weight": 1 + r(prev), f"stages.{i}.downsample.0.bias": r(prev),
                  f"stages.{i}.downsample.1.weight": r(c, prev, 2, 2), f"stages.{i}.downsample.1.bias": r(c)}
        for j in range(depth):
            b = f"stages.{i}.blocks.{j}."
            s |= {b + "conv_dw.weight": r(c, 1, 7, 7), b + "conv_dw.bias": r(c), b + "norm.weight": 1 + r(c),
                  b + "norm.bias": r(c), b + "mlp.fc1.weight": r(4 * c, c), b + "mlp.fc1.bias": r(4 * c),
                  b + "mlp.fc2.weight": r(c, 4 * c), b + "mlp.fc2.bias": r(c), b + "gamma": r(c)}
    return s


def save_open_clip(folder: Path, state: dict) -> Path:
    """As MGM's aux tower folder: open_clip_config.json + open_clip_pytorch_model.bin (visual.trunk.*)."""
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 8, "vision_cfg": {
        "timm_model_name": "convnext_large", "timm_pool": "", "timm_proj": "mlp", "image_size": 32}},
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}))
    torch.save({f"visual.trunk.{k}": v for k, v in state.items()} | {"visual.head.mlp.fc1.weight": torch.zeros(4, 32),
                                                                     "text.token_embedding.weight": torch.zeros(5, 8)},
               folder / "open_clip_pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("towers")
    state = timm_convnext_state()
    timm_dir = root / "timm-convnext"
    timm_dir.mkdir()
    (timm_dir / "config.json").write_text(json.dumps({"architecture": "convnext_tiny", "num_classes": 10,
                                                      "pretrained_cfg": {"input_size": [3, 32, 32]}}))
    save_file(state, str(timm_dir / "model.safetensors"))
    torch.manual_seed(0)
    hf = ConvNextModel(ConvNextConfig(hidden_sizes=WIDTHS, depths=DEPTHS, image_size=32))
    hf.save_pretrained(root / "hf-convnext")
    return {"open_clip": save_open_clip(root / "openclip-convnext", state), "timm": timm_dir,
            "transformers": root / "hf-convnext", "state": state}


@pytest.mark.parametrize("kind", ["open_clip", "timm"])
def test_aux_tower_equals_independent_convnext(towers, kind):
    model, size = load_aux_tower(towers[kind])
    assert size == 32 and model.config.hidden_sizes == WIDTHS and model.config.depths == DEPTHS
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model(pixels, output_hidden_states=True).hidden_states[1:]
    reference = convnext_stages(towers["state"], "", pixels)
    assert [o.shape for o in ours] == [r.shape for r in reference]
    for got, want in zip(ours, reference):
        assert torch.allclose(got, want, atol=1e-5)


def test_aux_tower_refuses_other_folders(tmp_path):
    with pytest.raises(TowerError, match="not a ConvNeXt folder vlmtune reads"):
        load_aux_tower(tmp_path)


MGM_BLOCKS = {"vision": ["encoder.layers[1/2:]"], "vision_aux": ["encoder.stages[:].layers[-1]"]}


def color_data(folder: Path) -> Path:
    records = []
    for i, (color, size) in enumerate([("red", 16), ("blue", 40), ("green", 24), ("red", 40)] * 2):
        make_image(folder / f"{i}.png", color, size=size)
        records.append({"id": f"s{i}", "messages": [{"role": "user", "content": "<image>What color?"},
                                                    {"role": "assistant", "content": color}], "images": [f"{i}.png"]})
    return write_jsonl(folder / "train.jsonl", records)


def run(model: dict, tune: dict, data: Path, out: Path, **output):
    cfg = load_config(tree={"model": model, "data": {"train": str(data), "max_length": 256}, "tune": tune,
                            "train": {"max_steps": 8, "batch_size": 8, "lr": 1e-2, "logging_steps": 1, "save_steps": 4,
                                      "warmup_ratio": 0.0}, "output": {"dir": str(out), **output}})
    result = train(cfg)
    assert result.final_loss < result.first_loss
    return json.loads((out / "vlmtune.json").read_text())


PLAIN = r"""
import sys; sys.modules["vlmtune"] = None  # plain transformers + PEFT only
import torch
from transformers import AutoModelForImageTextToText
folder, inputs, adapter = sys.argv[1], torch.load(sys.argv[2]), sys.argv[3:]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
if adapter:
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, adapter[0])
with torch.no_grad():
    torch.save(model.eval()(**inputs).logits, sys.argv[2] + ".logits")
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
"""


def plain_logits(folder: Path, inputs: dict, tmp: Path, adapter: Path | None = None) -> torch.Tensor:
    """Logits from a subprocess that cannot import vlmtune (its repo is not on the path either)."""
    torch.save(inputs, tmp / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", PLAIN, str(folder), str(tmp / "inputs.pt")] + ([str(adapter)] if adapter else []),
                          cwd=tmp, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp / "inputs.pt.logits")


def vlmtune_inputs(loaded) -> dict:
    from families.test_train_families import inputs_for

    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}]
    return inputs_for(loaded.processor, loaded.family, chat, Image.new("RGB", (30, 20), (0, 0, 255)))


def test_stages_build_train_merge_continue_and_load_in_plain_transformers(parts, towers, tmp_path):
    data = color_data(tmp_path / "data")
    built = {"family": "mgm", "vision": str(parts["vision"]), "vision_aux": str(towers["open_clip"]), "llm": str(parts["llm"])}
    stage1 = run(built, dict(vision="frozen", vision_aux="frozen", mining="full", projector="full", llm="frozen"),
                 data, tmp_path / "stage1")
    assert stage1["base"]["sources"]["vision_aux"] == str(towers["open_clip"])
    assert stage1["base"]["sources"]["mining"] == "new"
    files = {p.name for p in (tmp_path / "stage1").iterdir() if p.is_file()}
    assert files == FULL_FILES
    checkpoints = sorted((tmp_path / "stage1").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-4", "checkpoint-8"]
    for checkpoint in checkpoints:
        assert CODE <= {p.name for p in checkpoint.iterdir()}, checkpoint

    stage2 = run({"path": str(tmp_path / "stage1")}, dict(vision="frozen", vision_aux="frozen", mining="full",
                                                          projector="full", llm="lora"),
                 data, tmp_path / "stage2", merge=True)
    assert {c: v["mode"] for c, v in stage2["components"].items()}["llm"] == "lora"
    assert "processing_mgm.py" in {p.name for p in (tmp_path / "stage2").iterdir()}
    assert {p.name for p in (tmp_path / "stage2" / "merged").iterdir()} >= FULL_FILES - {"trainer_log.jsonl", "loss.png"}

    stage3 = run({"path": str(tmp_path / "stage2" / "merged")},
                 dict(vision="full", vision_aux="full", mining="full", projector="full", llm="frozen",
                      lr={"vision": 1e-3, "vision_aux": 1e-3}, blocks=MGM_BLOCKS),
                 data, tmp_path / "stage3")
    assert stage3["base"]["path"] == str((tmp_path / "stage2" / "merged").resolve())
    assert stage3["plan"]["blocks"]["vision"] == ["model.vision_tower.encoder.layers.1"]
    assert stage3["components"]["vision"]["trainable_params"] < stage3["components"]["vision"]["params"] / 2

    for folder, adapter in ((tmp_path / "stage2" / "merged", None), (tmp_path / "stage3", None),
                            (tmp_path / "stage1", tmp_path / "stage2")):
        loaded = load_model(adapter or folder)
        inputs = vlmtune_inputs(loaded)
        with torch.no_grad():
            ours = loaded.model.eval()(**inputs).logits
        assert torch.allclose(plain_logits(folder, inputs, tmp_path, adapter), ours, atol=1e-4), folder


def trainable(model) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad}


def test_blocks_last_half_of_the_vit_and_last_block_of_each_convnext_stage(family_model):
    from vlmtune.config.schema import TuneConfig
    from vlmtune.models.registry import family_named
    from vlmtune.tuning.plan import PlanError, TuningPlan

    folder = family_model("mgm", "bytelevel")
    mgm = family_named("mgm")
    full = TuningPlan(TuneConfig(vision="full", vision_aux="full", projector="frozen", llm="frozen", blocks=MGM_BLOCKS),
                      mgm, 1e-3)
    model = full.apply(load_model(folder).model)
    names = trainable(model)
    assert {n.split(".layers.")[1].split(".")[0] for n in names if n.startswith("model.vision_tower.")} == {"1"}
    aux = sorted({n.rsplit(".layers.", 1)[0] + ".layers." + n.rsplit(".layers.", 1)[1].split(".")[0]
                  for n in names if n.startswith("model.vision_tower_aux.")})
    assert aux == [f"model.vision_tower_aux.encoder.stages.{i}.layers.0" for i in range(4)]  # depth 1: last = 0
    assert full.blocks["vision"] == ["model.vision_tower.encoder.layers.1"]

    lora = TuningPlan(TuneConfig(vision="lora", vision_aux="full", projector="full", llm="frozen", blocks=MGM_BLOCKS),
                      mgm, 1e-3)
    model = lora.apply(load_model(folder).model)
    adapted = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted and all(".encoder.layers.1." in n for n in adapted)
    assert {n for n in trainable(model) if "vision_tower_aux" in n} and all(
        ".layers.0." in n for n in trainable(model) if "vision_tower_aux" in n)

    with pytest.raises(PlanError, match=r"`tune.blocks.vision`: 'encoder.layrs\[1/2:\]' names no module"):
        TuningPlan(TuneConfig(vision="full", blocks={"vision": ["encoder.layrs[1/2:]"]}), mgm, 1e-3).apply(
            load_model(folder).model)
    with pytest.raises(PlanError, match="the vision_aux is frozen"):
        TuningPlan(TuneConfig(vision="full", blocks={"vision_aux": ["encoder.stages[:].layers[-1]"]}), mgm, 1e-3)


def test_hd_builds_from_parts_trains_and_loads_in_plain_transformers(parts, towers, tmp_path):
    """MGM-HD from the config (`model.image_grid: 2`, `model.image_global: true`): 5 views per image,
    trained, reloaded in plain transformers with equal logits; sizes that cannot tile are refused."""
    from vlmtune.config import ConfigError
    from vlmtune.models.family import FamilyError

    data = color_data(tmp_path / "data")
    built = {"family": "mgm", "vision": str(parts["vision"]), "vision_aux": str(towers["open_clip"]),
             "llm": str(parts["llm"]), "image_size_aux": 32, "image_grid": 2, "image_global": True}
    run(built, dict(vision="frozen", vision_aux="frozen", mining="full", projector="full", llm="frozen"), data, tmp_path / "hd")
    config = json.loads((tmp_path / "hd" / "config.json").read_text())
    assert (config["image_grid"], config["image_global"], config["image_size_aux"]) == (2, True, 32)
    loaded = load_model(tmp_path / "hd")
    assert loaded.processor.num_image_tokens == 5 * 4
    inputs = vlmtune_inputs(loaded)
    assert inputs["pixel_values"].shape == (5, 3, 16, 16) and inputs["pixel_values_aux"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        ours = loaded.model.eval()(**inputs).logits
    assert torch.allclose(plain_logits(tmp_path / "hd", inputs, tmp_path), ours, atol=1e-4)

    with pytest.raises(ConfigError, match="`model.image_global` adds a whole-image view .* set `model.image_grid: 2`"):
        load_config(tree={"model": {**built, "image_grid": None}, "data": {"train": str(data)}})
    from vlmtune.models.mgm.build import check_sizes
    from transformers import CLIPVisionConfig

    with pytest.raises(FamilyError, match="image_size_aux 40 gives a 10x10 ConvNeXt map.*2x2 tokens x 2x2 crops; use a multiple of 16"):
        check_sizes(CLIPVisionConfig(image_size=16, patch_size=8), 40, image_grid=2)
