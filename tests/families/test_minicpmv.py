"""MiniCPM-V 2.x (OpenBMB remote code): original folders load into vlmtune's implementation without
running their code, with logits equal to an independent computation; every tuning mode trains; every
output folder loads with plain transformers (vlmtune blocked) and `chat` answers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_image, write_jsonl
from PIL import Image
from safetensors.torch import load_file

from families.minicpmv_tiny import build_original
from vlmtune.checkpoints.load import load_model
from vlmtune.cli import main
from vlmtune.config import load_config
from vlmtune.convert.layouts import load_any
from vlmtune.data.encode import SampleEncoder
from vlmtune.models import images as mm
from vlmtune.models.registry import layout_for
from vlmtune.training.run import train


@pytest.fixture(scope="module", params=["2.6", "2.5"])
def original(request, tmp_path_factory):
    return build_original(tmp_path_factory.mktemp(f"minicpmv{request.param}") / "model", request.param)


def reference_logits(folder, input_ids, pixel_values, tgt_sizes, positions):
    """MiniCPM-V's forward written out from the weights alone (torch ops, no vlmtune module)."""
    w, cfg = load_file(str(folder / "model.safetensors")), json.loads((folder / "config.json").read_text())
    vc, p = cfg["vision_config"], cfg["vision_config"]["patch_size"]
    per_side = vc["image_size"] // p
    feats = []
    for pix, (h, w_) in zip(pixel_values, tgt_sizes.tolist()):
        x = F.conv2d(pix[None, :, :, : h * w_ * p], w["vpm.embeddings.patch_embedding.weight"],
                     w["vpm.embeddings.patch_embedding.bias"], stride=p).flatten(2).transpose(1, 2)[0]
        rows = (torch.arange(h) * per_side // h)  # fractional coordinate bucketed into the grid
        cols = (torch.arange(w_) * per_side // w_)
        x = x + w["vpm.embeddings.position_embedding.weight"][(rows[:, None] * per_side + cols).flatten()]
        heads = vc["num_attention_heads"]
        for i in range(vc["num_hidden_layers"]):
            q = f"vpm.encoder.layers.{i}."
            y = F.layer_norm(x, x.shape[-1:], w[q + "layer_norm1.weight"], w[q + "layer_norm1.bias"], 1e-6)
            qkv = [F.linear(y, w[q + f"self_attn.{n}_proj.weight"], w[q + f"self_attn.{n}_proj.bias"])
                   .view(len(y), heads, -1).transpose(0, 1) for n in "qkv"]
            att = F.scaled_dot_product_attention(*qkv).transpose(0, 1).reshape(len(y), -1)
            x = x + F.linear(att, w[q + "self_attn.out_proj.weight"], w[q + "self_attn.out_proj.bias"])
            y = F.layer_norm(x, x.shape[-1:], w[q + "layer_norm2.weight"], w[q + "layer_norm2.bias"], 1e-6)
            y = F.gelu(F.linear(y, w[q + "mlp.fc1.weight"], w[q + "mlp.fc1.bias"]), approximate="tanh")
            x = x + F.linear(y, w[q + "mlp.fc2.weight"], w[q + "mlp.fc2.bias"])
        x = F.layer_norm(x, x.shape[-1:], w["vpm.post_layernorm.weight"], w["vpm.post_layernorm.bias"], 1e-6)
        feats.append(resample(w, x, h, w_, cfg["hidden_size"]))
    from transformers import AutoModelForCausalLM, AutoConfig  # the LLM alone, from its own config
    text = {k: v for k, v in cfg.items() if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                                 "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                                                 "rope_theta", "max_position_embeddings", "tie_word_embeddings")}
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2" if cfg["version"] >= 2.6 else "llama", **text))
    llm.load_state_dict({k[4:]: v for k, v in w.items() if k.startswith("llm.")})
    embeds = llm.get_input_embeddings()(input_ids).detach().clone()
    embeds[0, positions] = torch.cat(feats)
    return llm(inputs_embeds=embeds).logits


def resample(w, x, h, w_, dim):
    """One slice through the resampler: `nn.MultiheadAttention` with OpenBMB's 2D sin-cos keys."""
    def sincos(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        a = pos.double()[:, None] * omega
        return torch.cat([a.sin(), a.cos()], 1)
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w_), indexing="ij")
    pos = torch.cat([sincos(dim // 2, c.flatten()), sincos(dim // 2, r.flatten())], 1).float()
    kv = F.layer_norm(x @ w["resampler.kv_proj.weight"].T, (dim,), w["resampler.ln_kv.weight"], w["resampler.ln_kv.bias"], 1e-6)
    q = F.layer_norm(w["resampler.query"], (dim,), w["resampler.ln_q.weight"], w["resampler.ln_q.bias"], 1e-6)
    mha = torch.nn.MultiheadAttention(dim, dim // 128)
    mha.load_state_dict({k[len("resampler.attn."):]: v for k, v in w.items() if k.startswith("resampler.attn.")})
    out = mha(q[:, None], (kv + pos)[:, None], kv[:, None])[0][:, 0]
    return F.layer_norm(out, (dim,), w["resampler.ln_post.weight"], w["resampler.ln_post.bias"], 1e-6) @ w["resampler.proj"]


def encoded(loaded, image):
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}]
    encoder = SampleEncoder(loaded.processor, loaded.family, 1 << 20)
    ids, blocks = encoder.generation_ids(chat, [image])
    return torch.tensor([ids]), mm.image_inputs(loaded.processor, [image], blocks)


def test_original_folder_loads_without_its_code_with_independent_logits(original):
    assert layout_for(original)[1].name == "MiniCPM-V 2.x folder (OpenBMB remote code)"
    loaded = load_any(original)  # the folder's .py files raise if executed
    image = Image.new("RGB", (40, 24), (200, 30, 30))
    input_ids, pixels = encoded(loaded, image)
    assert pixels["tgt_sizes"].tolist() == [[3, 5]] * 5  # overview + a 2x2 grid of slices
    # the encoder's ids are the processor's own
    text = loaded.processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": loaded.processor.image_token + "\nWhat color?"}], tokenize=False, add_generation_prompt=True)
    assert loaded.processor(text=text, images=[image])["input_ids"].tolist() == input_ids.tolist()
    positions = (input_ids[0] == loaded.processor.image_token_id).nonzero()[:, 0]
    assert len(positions) == 5 * 4
    with torch.no_grad():
        ours = loaded.model.eval()(input_ids=input_ids, **pixels).logits
        ref = reference_logits(original, input_ids, pixels["pixel_values"], pixels["tgt_sizes"], positions)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    # OpenBMB's calling convention gives the same logits
    bounds = [torch.tensor([[int(positions[i * 4]), int(positions[i * 4]) + 4] for i in range(5)])]
    sizes = pixels["tgt_sizes"]
    data = {"input_ids": input_ids, "pixel_values": [[pixels["pixel_values"][i, :, :, : int(sizes[i].prod()) * 4]
                                                      for i in range(5)]], "tgt_sizes": [sizes], "image_bound": bounds}
    with torch.no_grad():
        assert torch.allclose(loaded.model(data=data).logits, ours, atol=1e-5)


def color_data(folder):
    records = []
    for i, (color, size) in enumerate([("red", 16), ("blue", 40), ("green", 24), ("red", 40)] * 2):
        make_image(folder / f"{i}.png", color, size=size)
        records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [
            {"role": "user", "content": "<image>\nWhat color?"}, {"role": "assistant", "content": color}]})
    records.append({"id": "text", "conversations": [{"role": "user", "content": "Hello there"},
                                                    {"role": "assistant", "content": "yes"}]})
    return write_jsonl(folder / "train.jsonl", records)


CODE = {"configuration_minicpmv.py", "modeling_minicpmv.py", "resampler_minicpmv.py", "processing_minicpmv.py",
        "image_processing_minicpmv.py"}
PLAIN_LOAD = r"""
import sys, json
sys.modules["vlmtune"] = None  # vlmtune is not installed
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, AutoTokenizer
out, base, logits_file = sys.argv[1], sys.argv[2], sys.argv[3]
if base:
    from peft import PeftModel
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(base, trust_remote_code=True), out)
else:
    model = AutoModel.from_pretrained(out, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
assert type(processor).__name__ == "MiniCPMVProcessor", type(processor)
image = Image.new("RGB", (40, 24), (255, 0, 0))
prompt = tokenizer.apply_chat_template([{"role": "user", "content": processor.image_token + "\nWhat color?"}],
                                       tokenize=False, add_generation_prompt=True)
with torch.no_grad():
    torch.save(model.eval()(**processor(text=prompt, images=[image])).logits, logits_file)
answer = model.chat(image=Image.new("RGB", (40, 24), (255, 0, 0)), msgs=[{"role": "user", "content": "What color?"}],
                           tokenizer=tokenizer, processor=processor, max_new_tokens=3)
inner = model.get_base_model() if base else model
print(json.dumps({"answer": answer, "module": type(inner).__module__}))
"""

RUNS = {"vision-only": dict(vision="full", resampler="frozen", llm="frozen"),  # OpenBMB: tune_vision, not tune_llm
        "resampler-only": dict(vision="frozen", resampler="full", llm="frozen"),
        "llm-lora": dict(vision="frozen", resampler="full", llm="lora", embeddings="full"),  # OpenBMB: use_lora
        "full": dict(vision="full", resampler="full", llm="full"),
        "lora-all": dict(vision="lora", resampler="lora", llm="lora")}


@pytest.mark.parametrize("run", RUNS)
def test_every_mode_trains_and_the_output_loads_the_minicpmv_way(original, run, tmp_path):
    if json.loads((original / "config.json").read_text())["version"] < 2.6 and run not in ("vision-only", "llm-lora"):
        pytest.skip("2.5 runs the seed's two modes; the rest are the same code")
    out = tmp_path / "out"
    cfg = load_config(tree={"model": {"path": str(original)},
                            "data": {"train": str(color_data(tmp_path / "data")), "max_length": 512},
                            "tune": RUNS[run],
                            "train": {"max_steps": 6, "batch_size": 4, "lr": 5e-3, "logging_steps": 1, "save_steps": 0,
                                      "warmup_ratio": 0.0, "gradient_checkpointing": run == "full"},
                            "output": {"dir": str(out)}})
    result = train(cfg)
    assert result.final_loss < result.first_loss
    manifest = json.loads((out / "vlmtune.json").read_text())
    assert manifest["family"] == "minicpmv"
    assert set(json.loads(((Path(manifest["base"]["path"]) if (out / "adapter_config.json").is_file() else out)
                           / "vlmtune.json").read_text())["code"]) == CODE
    embeddings = {"embeddings": "full" if RUNS[run]["llm"] == "full" else "frozen"}  # they follow the LLM unless named
    assert {c: v["mode"] for c, v in manifest["components"].items()} == {**embeddings, **RUNS[run]}
    adapter = (out / "adapter_config.json").is_file()
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] if adapter else ""
    model_files = {p.name for p in (Path(base) if adapter else out).iterdir()}
    assert model_files - {"loss.png", "trainer_log.jsonl"} == CODE | {
        "config.json", "generation_config.json", "model.safetensors", "processor_config.json", "preprocessor_config.json",
        "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vlmtune.json"}
    if adapter:  # the original folder cannot load in plain transformers 5: the run wrote a loadable base
        assert Path(base) == (out / "base").resolve()
        assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    done = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out), base, str(tmp_path / "plain.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reply = json.loads(done.stdout.strip().splitlines()[-1])
    assert reply["module"].startswith("transformers_modules")  # the folder's (our) code, not vlmtune
    assert isinstance(reply["answer"], str)
    loaded = load_model(out)  # vlmtune's view (adapter merged) gives the plain-transformers logits
    image = Image.new("RGB", (40, 24), (255, 0, 0))
    tok = loaded.processor.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": loaded.processor.image_token + "\nWhat color?"}],
                                     tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        ours = loaded.model.eval()(**loaded.processor(text=prompt, images=[image])).logits
    assert torch.allclose(torch.load(tmp_path / "plain.pt"), ours, atol=1e-4)


def test_folder_code_runs_only_when_trusted(original):
    with pytest.raises(Exception, match="the original folder's code was executed"):
        load_any(original, trust_remote_code=True)


def test_convert_writes_a_folder_with_the_original_logits(original, tmp_path):
    out = tmp_path / "converted"
    assert main(["convert", str(original), "--out", str(out)]) == 0
    assert CODE <= {p.name for p in out.iterdir()}
    manifest = json.loads((out / "vlmtune.json").read_text())
    assert manifest["family"] == "minicpmv" and set(manifest["code"]) == CODE
    image = Image.new("RGB", (40, 24), (30, 30, 200))
    before, after = load_any(original), load_any(out)
    assert after.kind == "full" and before.kind == "converted"
    input_ids, pixels = encoded(before, image)
    with torch.no_grad():
        assert torch.equal(before.model.eval()(input_ids=input_ids, **pixels).logits,
                           after.model.eval()(input_ids=input_ids, **pixels).logits)


def test_chat_in_vlmtune_uses_no_folder_code(original):
    loaded = load_any(original)  # the folder's processing .py would raise if `chat` loaded it
    answer = loaded.model.eval().chat(image=Image.new("RGB", (16, 16), (0, 200, 0)), sampling=False, max_new_tokens=4,
                                      msgs=[{"role": "user", "content": "What color?"}], tokenizer=loaded.processor.tokenizer)
    assert isinstance(answer, str)
    text = "(<image>./</image>)\nWhat color?"
    one = loaded.processor(text=text, images=[Image.new("RGB", (40, 24))], max_slice_nums=1)  # OpenBMB's chat option
    assert one["tgt_sizes"].shape[0] == 1 and loaded.processor(text=text, images=[Image.new("RGB", (40, 24))])["tgt_sizes"].shape[0] == 5
    assert isinstance(loaded.model.chat(image=Image.new("RGB", (40, 24)), msgs=[{"role": "user", "content": "Hi"}], sampling=False,
                                        max_new_tokens=2, max_slice_nums=1, tokenizer=loaded.processor.tokenizer), str)


def test_placeholder_count_mismatch_names_both_numbers(original):
    loaded = load_any(original)
    input_ids, pixels = encoded(loaded, Image.new("RGB", (40, 24)))
    with pytest.raises(ValueError, match=r"has 20 image placeholder token\(s\) but the images give 4 slice\(s\) x 4 = 16"):
        loaded.model(input_ids=input_ids, pixel_values=pixels["pixel_values"][:4], tgt_sizes=pixels["tgt_sizes"][:4])


def test_missing_processor_files_are_named(original, tmp_path):
    import shutil

    copy = shutil.copytree(original, tmp_path / "copy")
    (copy / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match=r"copy/ has no preprocessor_config.json|has no preprocessor_config.json: a MiniCPM-V folder needs it"):
        load_any(copy)


def test_inspect_in_a_fresh_process_names_the_layout_and_runs_no_code(original):
    done = subprocess.run([sys.executable, "-m", "vlmtune.cli", "inspect", "--json", str(original)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    info = json.loads(done.stdout)
    assert info["family"] == "minicpmv" and info["layout"].startswith("MiniCPM-V 2.x folder (OpenBMB remote code)")
    assert set(info["components"]) == {"vision", "resampler", "llm", "embeddings"}


def test_two_images_get_the_processor_ids_numbered_per_sample(original):
    loaded = load_any(original)
    images = [Image.new("RGB", (40, 24), (200, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 200))]
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}]
    encoder = SampleEncoder(loaded.processor, loaded.family, 1 << 20)
    ids, blocks = encoder.generation_ids(chat, images)
    mark = loaded.processor.image_token + "\n"
    text = loaded.processor.tokenizer.apply_chat_template([{"role": "user", "content": mark * 2 + "Same?"}], tokenize=False,
                                                          add_generation_prompt=True)
    assert loaded.processor(text=text, images=images)["input_ids"][0].tolist() == ids
    decoded = loaded.processor.tokenizer.decode(ids)
    numbered = json.loads((original / "config.json").read_text())["version"] >= 2.6
    assert ("<image_id>0</image_id>" in decoded and "<image_id>1</image_id>" in decoded) == numbered
    with torch.no_grad():  # 5 slices for the first image, 1 for the second, in order
        pixels = mm.image_inputs(loaded.processor, images, blocks)
        assert pixels["tgt_sizes"].tolist() == [[3, 5]] * 5 + [[4, 4]]
        assert loaded.model(input_ids=torch.tensor([ids]), **pixels).logits.isfinite().all()
