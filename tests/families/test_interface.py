"""The family interface: component maps (longest prefix, nothing unassigned), `tune` keys checked
against the family, a model vlmtune does not know tuned through `model.components`, Qwen's rope
positions, packages a processor needs, `inspect`'s component map, and `data show`."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_image, write_jsonl
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from families import tiny
from vlmtune.checkpoints.inspect import describe
from vlmtune.checkpoints.load import load_model
from vlmtune.config import load_config
from vlmtune.data.check import check_data, encode_checked
from vlmtune.data.encode import SampleEncoder
from vlmtune.data.dataset import ConversationDataset, collator_for
from vlmtune.models.family import Family, FamilyError, custom_family
from vlmtune.models.registry import family_for, family_named
from vlmtune.training.run import train
from vlmtune.tuning.plan import PlanError, TuningPlan


def data_file(folder, n=6):
    records = []
    for i in range(n):
        color = ("red", "blue", "green")[i % 3]
        make_image(folder / f"{i}.png", color, size=(16, 40, 24)[i % 3])
        records.append({"id": f"s{i}", "messages": [{"role": "user", "content": "<image>What color?"},
                                                     {"role": "assistant", "content": color}], "images": [f"{i}.png"]})
    return write_jsonl(folder / "train.jsonl", records)


def test_longest_prefix_decides_and_every_parameter_has_a_component(family_model):
    model = AutoModelForImageTextToText.from_pretrained(family_model("qwen3_vl", "bytelevel"))
    family = family_named("qwen3_vl")
    assert family.component_of("model.visual.blocks.0.attn.qkv.weight") == "vision"
    assert family.component_of("model.visual.merger.linear_fc1.weight") == "projector"
    assert family.component_of("base_model.model.model.visual.deepstack_merger_list.0.norm.weight") == "projector"
    assert family.uncovered(model) == []
    counts = {c: sum(p.numel() for n, p in model.named_parameters() if family.component_of(n) == c)
              for c in family.components}
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters()) and min(counts.values()) > 0
    partial = Family("partial", {"vision": ("model.visual",), "llm": ("model.language_model",)}, lambda c: False)
    with pytest.raises(ValueError, match=r"1 parameter\(s\) of this partial model belong to no component .*lm_head"):
        partial.check_components(model)


def test_tune_keys_are_checked_against_the_family(family_model):
    cfg = load_config(tree={"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "output": {"dir": "o"},
                            "tune": {"resampler": "full", "lr": {"visoin_aux": 1e-4}}})
    with pytest.raises(PlanError) as err:
        TuningPlan(cfg.tune, family_named("llava"), 1e-4)
    message = str(err.value)
    assert "`tune.resampler`: the llava family has no component 'resampler'" in message
    assert "`tune.lr.visoin_aux`" in message and "its components are vision, projector, llm" in message
    typo = load_config
    with pytest.raises(Exception, match=r"unknown key `tune.visoin`; did you mean `tune.vision`\?"):
        typo(tree={"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "output": {"dir": "o"},
                   "tune": {"visoin": "full"}})


def test_a_model_vlmtune_does_not_know_trains_through_model_components(tmp_path):
    folder = tiny.build_vipllava(tmp_path / "vip")
    data = data_file(tmp_path / "data")
    tree = {"model": {"path": str(folder)}, "data": {"train": str(data), "max_length": 256},
            "tune": {"vision": "frozen", "projector": "full", "llm": "lora"},
            "train": {"max_steps": 6, "batch_size": 3, "lr": 1e-2, "logging_steps": 1, "save_steps": 3,
                      "warmup_ratio": 0.0},
            "output": {"dir": str(tmp_path / "out")}}
    with pytest.raises(ValueError, match=r"'vipllava' is not a family vlmtune knows .*`model.components`"):
        train(load_config(tree=tree))
    tree["model"]["components"] = {"vision": ["model.vision_tower"], "projector": ["model.multi_modal_projector"],
                                   "llm": ["model.language_model", "lm_head"]}
    result = train(load_config(tree=tree))
    assert result.final_loss < result.first_loss
    reloaded = load_model(tmp_path / "out")  # the family's component map travels in the manifest
    assert reloaded.family.name == "custom (vipllava)" and set(reloaded.family.components) == {"vision", "projector", "llm"}
    tree["model"]["components"] = {"vision": ["model.vision_tower"], "llm": ["model.language_model"]}
    tree["tune"] = {"vision": "frozen", "llm": "lora"}
    tree["output"]["dir"] = str(tmp_path / "out2")
    with pytest.raises(ValueError, match=r"belong to no component .*multi_modal_projector"):
        train(load_config(tree=tree))


def test_qwen_position_ids_are_the_models_own(family_model, tmp_path):
    folder = family_model("qwen2_vl", "bytelevel")
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    family = family_for(AutoConfig.from_pretrained(folder))
    report = check_data([str(data_file(tmp_path))])
    encode_checked(report, SampleEncoder(processor, family, 512))
    batch = collator_for(family, processor.tokenizer.pad_token_id)(
        [ConversationDataset(report.encoded, processor, family)[i] for i in range(3)])  # three image sizes
    positions = family.position_ids(model, batch)
    assert positions.shape == (3, 3, batch["input_ids"].shape[1])
    assert not torch.equal(positions[1], positions[2])  # height and width rows differ on image tokens
    with torch.inference_mode():
        implicit = model(**batch).logits
        explicit = model(**batch, position_ids=positions).logits
    mask = batch["attention_mask"].bool()
    assert torch.allclose(implicit[mask], explicit[mask], atol=1e-5)


def test_a_missing_processor_package_is_one_sentence():
    family = Family("needs-pkg", {"llm": ("model",)}, lambda c: False, requires=("vlmtune_no_such_package",))
    with pytest.raises(FamilyError) as err:
        family.check_requirements()
    assert str(err.value).startswith("the needs-pkg family's processor needs vlmtune_no_such_package: pip install")
    assert family_named("qwen2_vl").requires == ("torchvision",) and family_named("llava").requires == ()


def test_inspect_names_the_family_and_its_components(family_model):
    folder = family_model("idefics3", "bytelevel")
    info = describe(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    family = family_named("idefics3")
    assert info["family"] == "idefics3"
    for component in family.components:
        expected = sum(p.numel() for n, p in model.named_parameters() if family.component_of(n) == component)
        assert info["components"][component]["params"] == expected


def test_data_show_prints_ids_labels_and_blocks(family_model, tmp_path):
    folder = family_model("llava", "sentencepiece")
    data = data_file(tmp_path, n=2)
    out = subprocess.run([sys.executable, "-m", "vlmtune.cli", "data", "show", str(data), "--model", str(folder),
                          "--index", "1", "--json"], capture_output=True, text=True, check=True)
    shown = json.loads(out.stdout)
    processor = AutoProcessor.from_pretrained(folder)
    report = check_data([str(data)])
    encode_checked(report, SampleEncoder(processor, family_named("llava"), 2048))
    assert len(shown) == 1 and shown[0]["id"] == "s1"
    assert shown[0]["input_ids"] == report.encoded[1].input_ids and shown[0]["labels"] == report.encoded[1].labels
    trained = [t for t, label in zip(shown[0]["input_ids"], shown[0]["labels"]) if label != -100]
    assert processor.tokenizer.decode(trained).strip() == "blue<|im_end|>"
    first, last = shown[0]["image_blocks"][0]
    assert shown[0]["input_ids"][first:last] == [processor.image_token_id] * (last - first)
    text = subprocess.run([sys.executable, "-m", "vlmtune.cli", "data", "show", str(data), "--model", str(folder)],
                          capture_output=True, text=True, check=True).stdout
    assert "[image 0: 4 tokens]" in text and "line 2 (id s1)" in text
    assert custom_family("x", {"llm": ["model"]}).component_of("model.layers.0") == "llm"


def test_stage1_build_holds_the_llm_once(parts):
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

    from vlmtune.models.llava import build_from_parts, load_vision
    from vlmtune.models.registry import builder

    llm = AutoModelForCausalLM.from_pretrained(parts["llm"])
    vision = load_vision(str(parts["vision"]))
    model, _ = build_from_parts(vision, AutoImageProcessor.from_pretrained(parts["vision"]), llm,
                                AutoTokenizer.from_pretrained(parts["llm"]))
    # the loaded parts are moved in, not copied: no second full model in memory
    assert model.model.language_model.embed_tokens.weight.data_ptr() == llm.get_input_embeddings().weight.data_ptr()
    assert model.lm_head.weight.data_ptr() == llm.get_output_embeddings().weight.data_ptr()
    assert model.model.vision_tower is vision
    assert all(p.device.type == "cpu" for p in model.parameters())
    projector = model.model.multi_modal_projector.linear_1.weight
    assert 0 < projector.std() < 0.1  # initialised like transformers initialises it (normal, std 0.02)
    assert builder().name == "llava"
