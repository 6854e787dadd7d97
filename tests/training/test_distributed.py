"""Two processes (torchrun, DDP or FSDP2 over gloo on the CPU) train like one with the same global batch,
write one complete verified folder, mix text-only and image batches with a trainable vision tower, and
resume across process counts (and, for FSDP, across strategies)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import make_image, write_jsonl
from families import tiny
from safetensors.torch import load_file

from vlmtune.checkpoints.verify import verify
from vlmtune.config import ConfigError, load_config
from vlmtune.training.distributed import Processes, check_strategy, deepspeed_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def mixed_color_data(folder):
    """Half the samples have no image: many micro-batches of 2 hold none, so the tower gets no gradient there."""
    records = []
    for i, color in enumerate(["red", "blue", "green", "red", "blue", "green", "red", "blue"]):
        make_image(folder / f"{i}.png", color)
        records.append({"id": f"img{i}", "images": [f"{i}.png"], "messages": [
            {"role": "user", "content": "<image>What color?"}, {"role": "assistant", "content": color}]})
        records.append({"id": f"text{i}", "messages": [{"role": "user", "content": "Hello there"},
                                                       {"role": "assistant", "content": "yes no maybe"}]})
    return write_jsonl(folder / "train.jsonl", records)


def write_config(tmp_path, model, data, out, batch_size, tune, data_extra=None, **train):
    cfg = {"model": {"path": str(model)}, "data": {"train": str(data), "max_length": 256, **(data_extra or {})},
           "tune": tune,
           "train": {"max_steps": 6, "batch_size": batch_size, "lr": 1e-2, "logging_steps": 1, "save_steps": 2,
                     "warmup_ratio": 0.0, "seed": 3, **train},
           "output": {"dir": str(out)}}
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(config, nproc, *extra):
    command = [sys.executable, "-m", "vlmtune.cli", "train", str(config), *extra]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "vlmtune.cli", "train", str(config), *extra]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines()) if "loss" in r]


TUNES = {"full": {"vision": "full", "projector": "full", "llm": "full"},
         # no LoRA dropout: its random masks depend on how samples are spread over processes
         "lora": {"vision": "full", "projector": "full", "llm": "lora", "lora": {"dropout": 0.0}}}


@pytest.mark.parametrize("mode", TUNES)
def test_two_processes_train_like_one_and_resume_across_process_counts(tiny_vlm, tmp_path, mode):
    data = mixed_color_data(tmp_path / "data")
    one = tmp_path / "one"
    two = tmp_path / "two"
    run(write_config(tmp_path, tiny_vlm, data, one, 4, TUNES[mode]), 1)
    printed = run(write_config(tmp_path, tiny_vlm, data, two, 2, TUNES[mode]), 2)

    assert printed.count("saved and verified") == 1  # one process reports, and one writes
    assert len(losses(two)) == 6
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    assert verify(two).ok
    checkpoint = two / "checkpoint-4"
    assert {f"rng_state_{rank}.pth" for rank in (0, 1)} <= {p.name for p in checkpoint.iterdir()}
    weights = "adapter_model.safetensors" if mode == "lora" else "model.safetensors"
    expected = load_file(two / weights)

    # a kill after checkpoint-4 of the two-process run, resumed on one process: the same final weights
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed, ignore=shutil.ignore_patterns("checkpoint-6"))
    for name in ("vlmtune.json", weights):
        (resumed / name).unlink()
    config = write_config(tmp_path, tiny_vlm, data, resumed, 4, TUNES[mode])
    run(config, 1, "--resume", "--force-resume")  # --force-resume: batch_size 2 -> 4 keeps the global batch
    assert_same_weights(load_file(resumed / weights), expected)


def test_two_padding_free_processes_train_like_one_padded(tiny_vlm, tmp_path):
    """Each process joins its micro-batch of 2 into one row (half the rows text-only, the tower trained):
    the losses and weights of one padded process with the same global batch."""
    data = mixed_color_data(tmp_path / "data")
    one, two = tmp_path / "one", tmp_path / "two"
    run(write_config(tmp_path, tiny_vlm, data, one, 4, TUNES["full"]), 1)
    printed = run(write_config(tmp_path, tiny_vlm, data, two, 2, TUNES["full"], {"padding_free": True}), 2)
    assert "data.padding_free: each batch's 2 samples joined in one row" in printed
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    assert_same_weights(final_weights(two, "full"), final_weights(one, "full"))


def test_one_process_checkpoint_resumes_on_two(tiny_vlm, tmp_path):
    data = mixed_color_data(tmp_path / "data")
    one = tmp_path / "one"
    run(write_config(tmp_path, tiny_vlm, data, one, 4, TUNES["full"]), 1)
    expected = load_file(one / "model.safetensors")
    resumed = tmp_path / "resumed"
    shutil.copytree(one, resumed, ignore=shutil.ignore_patterns("checkpoint-6"))
    for name in ("vlmtune.json", "model.safetensors"):
        (resumed / name).unlink()
    run(write_config(tmp_path, tiny_vlm, data, resumed, 2, TUNES["full"]), 2, "--resume", "--force-resume")
    assert_same_weights(load_file(resumed / "model.safetensors"), expected)


def test_nproc_runs_the_same_command_under_torchrun(tiny_vlm, tmp_path):
    data = mixed_color_data(tmp_path / "data")
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_vlm, data, out, 2, TUNES["lora"], max_steps=2, save_steps=0)
    printed = run(config, 1, "--nproc", "2")
    assert "saved and verified" in printed and verify(out).ok


def test_two_nodes_train_like_one_process(tiny_vlm, tmp_path):
    """The documented multi-node launch (torchrun on each node, node ranks 0 and 1, one process each) on
    one machine: both nodes' first processes prepare the data, the global first process writes."""
    import socket

    data = mixed_color_data(tmp_path / "data")
    one, nodes = tmp_path / "one", tmp_path / "nodes"
    run(write_config(tmp_path, tiny_vlm, data, one, 4, TUNES["full"]), 1)
    config = write_config(tmp_path, tiny_vlm, data, nodes, 2, TUNES["full"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
              "--master_addr", "127.0.0.1", "--master_port", str(port)]
    node = [subprocess.Popen(launch + ["--node_rank", str(rank), "-m", "vlmtune.cli", "train", str(config)], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    printed = [p.communicate(timeout=420) for p in node]
    assert all(p.returncode == 0 for p in node), printed[0][1][-3000:] + printed[1][1][-3000:]
    assert "saved and verified" in printed[0][0] and "saved and verified" not in printed[1][0]
    assert losses(nodes) == pytest.approx(losses(one), rel=1e-4)
    assert_same_weights(final_weights(nodes, "full"), final_weights(one, "full"))


def cfg_with(**distributed):
    return load_config(tree={"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "output": {"dir": "o"},
                             "train": {"distributed": distributed}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_deepspeed_is_refused_without_a_gpu_and_fsdp_what_it_cannot_shard():
    two = Processes(rank=0, local_rank=0, world_size=2)
    with pytest.raises(ConfigError, match="strategy=deepspeed` needs CUDA GPUs and none was found"):
        check_strategy(cfg_with(strategy="deepspeed"), two)
    check_strategy(cfg_with(strategy="fsdp"), two)
    with pytest.raises(ConfigError, match="fsdp` with `tune.quantize` .* use strategy=ddp for QLoRA"):
        check_strategy(load_config(tree={"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "output": {"dir": "o"},
                                         "tune": {"llm": "lora", "quantize": "4bit"},
                                         "train": {"distributed": {"strategy": "fsdp"}}}), two)
    with pytest.raises(ConfigError, match="offload_params` with fsdp .* this machine has no GPU"):
        check_strategy(cfg_with(strategy="fsdp", offload_params=True), two)
    with pytest.raises(ConfigError, match="offload_optimizer` is DeepSpeed's; .* use offload_params=true"):
        check_strategy(cfg_with(strategy="fsdp", offload_optimizer=True), two)
    check_strategy(cfg_with(strategy="deepspeed"), Processes())  # one process ignores the section


FSDP = {"distributed": {"strategy": "fsdp"}}


def final_weights(out, mode):
    return load_file(out / ("adapter_model.safetensors" if mode == "lora" else "model.safetensors"))


def assert_same_weights(got, expected):
    """A key projection's bias reaches no output (softmax over keys ignores the constant q.b it adds), so
    its gradient is rounding noise, which differs between process layouts and which Adam scales into steps:
    it is held to 1e-4 (its values stay near 1e-5 here), every other weight to 1e-5."""
    assert got.keys() == expected.keys()
    for key in expected:
        atol = 1e-4 if key.endswith("k_proj.bias") else 1e-5
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=atol, msg=key)


def resume_copy(tmp_path, done, name, mode):
    """`done` as a kill after checkpoint-4 would have left it: no checkpoint-6, no final folder."""
    resumed = tmp_path / name
    shutil.copytree(done, resumed, ignore=shutil.ignore_patterns("checkpoint-6", "merged"))
    for file in ("vlmtune.json", "adapter_model.safetensors" if mode == "lora" else "model.safetensors"):
        (resumed / file).unlink()
    return resumed


@pytest.mark.parametrize("mode", TUNES)
def test_fsdp_shards_the_llm_trains_like_one_process_and_resumes_without_it(tiny_vlm, tmp_path, mode):
    """FSDP2 over two gloo processes, half the micro-batches text-only with a trainable tower: the LLM's
    layers are sharded units, the losses and final weights are one process's, the folder is complete
    (a LoRA run's merged model too), and its checkpoint resumes on one process without FSDP."""
    data = mixed_color_data(tmp_path / "data")
    one, two = tmp_path / "one", tmp_path / "two"
    run(write_config(tmp_path, tiny_vlm, data, one, 4, TUNES[mode]), 1)
    merge = {"output": {"merge": True}} if mode == "lora" else {}
    config = write_config(tmp_path, tiny_vlm, data, two, 2, TUNES[mode], **FSDP)
    if merge:
        config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "output": {"dir": str(two), "merge": True}}))
    printed = run(config, 2)

    # the root, the embeddings, each decoder layer and the head (+ final norm) are units; the tower is in the root
    assert re.search(r"fsdp: 5 units \(1 x \w+, 1 x Embedding, 2 x LlamaDecoderLayer, 1 x Linear\) over 2 processes", printed)
    assert printed.count("saved and verified") == 1
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    assert verify(two).ok
    assert_same_weights(final_weights(two, mode), final_weights(one, mode))
    checkpoint = {p.name for p in (two / "checkpoint-4").iterdir()}
    assert {"optimizer.pt", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"} <= checkpoint
    assert not {"optimizer.bin", "pytorch_model_fsdp.bin"} & checkpoint  # the format of every other run
    if mode == "lora":
        assert verify(two / "merged").ok

    resumed = resume_copy(tmp_path, two, "resumed", mode)
    run(write_config(tmp_path, tiny_vlm, data, resumed, 4, TUNES[mode]), 1, "--resume", "--force-resume")
    assert_same_weights(final_weights(resumed, mode), final_weights(one, mode))


def test_fsdp_checkpoints_resume_under_fsdp_and_one_process_checkpoints_too(tiny_vlm, tmp_path):
    data = mixed_color_data(tmp_path / "data")
    one, two = tmp_path / "one", tmp_path / "two"
    run(write_config(tmp_path, tiny_vlm, data, one, 4, TUNES["full"]), 1)
    run(write_config(tmp_path, tiny_vlm, data, two, 2, TUNES["full"], **FSDP), 2)
    expected = final_weights(one, "full")
    for source in (two, one):
        resumed = resume_copy(tmp_path, source, f"{source.name}_on_fsdp", "full")
        run(write_config(tmp_path, tiny_vlm, data, resumed, 2, TUNES["full"], **FSDP), 2, "--resume", "--force-resume")
        assert_same_weights(final_weights(resumed, "full"), expected)


def test_fsdp_trains_qwen2_vl_with_text_only_batches(tmp_path):
    """A second family: Qwen2-VL's tower (its own patch embedding and merger) in the root unit, its
    Qwen2 decoder layers sharded; losses as one process."""
    model = tiny.build("qwen2_vl", tmp_path / "qwen", "bytelevel")
    data = mixed_color_data(tmp_path / "data")
    one, two = tmp_path / "one", tmp_path / "two"
    run(write_config(tmp_path, model, data, one, 4, TUNES["full"]), 1)
    printed = run(write_config(tmp_path, model, data, two, 2, TUNES["full"], **FSDP), 2)
    assert "x Qwen2VLDecoderLayer" in printed
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    assert verify(two).ok
    assert_same_weights(final_weights(two, "full"), final_weights(one, "full"))


def test_deepspeed_config_follows_the_section_and_leaves_sizes_to_the_trainer(tmp_path):
    zero3 = deepspeed_config(cfg_with(strategy="deepspeed", zero_stage=3, offload_optimizer=True, offload_params=True))
    assert zero3["zero_optimization"]["stage"] == 3
    assert zero3["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert zero3["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True  # full weights on save
    assert {zero3[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps")} == {"auto"}
    zero2 = deepspeed_config(cfg_with(strategy="deepspeed"))
    assert zero2["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in zero2["zero_optimization"]
    with pytest.raises(ConfigError, match="offload_params` needs zero_stage 3"):
        deepspeed_config(cfg_with(strategy="deepspeed", offload_params=True))
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert deepspeed_config(cfg_with(strategy="deepspeed", deepspeed_config=str(own))) == {"zero_optimization": {"stage": 1}}


def test_data_prepared_once_per_machine_round_trips_exactly(tiny_vlm, tmp_path):
    """What the first process on a machine writes for the others (checked, encoded samples and the
    problems) reads back equal, field for field; the 2-process runs above train on it."""
    from vlmtune.checkpoints.load import load_model
    from vlmtune.data.check import check_data, encode_checked
    from vlmtune.data.encode import SampleEncoder
    from vlmtune.data.shared import read_reports, shared_file, write_reports

    data = mixed_color_data(tmp_path / "data")
    with data.open("a") as f:
        f.write('{"id": "broken", "images": ["missing.png"], "messages": []}\n')
    report = check_data([str(data)])
    loaded = load_model(tiny_vlm)
    encode_checked(report, SampleEncoder(loaded.processor, loaded.family, 256))
    assert report.encoded and report.problems and report.encoded[0].images
    path = shared_file(tmp_path / "out")
    assert path == shared_file(tmp_path / "out") and path != shared_file(tmp_path / "other")
    with pytest.MonkeyPatch.context() as env:  # two nodes on one machine (or one temporary folder) never share it
        env.setenv("GROUP_RANK", "1")
        assert shared_file(tmp_path / "out") != path
    write_reports(path, {"train": report})
    try:
        assert read_reports(path) == {"train": report}
    finally:
        path.unlink()
    path.write_text("{not json")
    with pytest.raises(RuntimeError, match="cannot be read .* Set TMPDIR to a machine-local one"):
        read_reports(path)
    path.unlink()


def test_only_a_machine_with_several_processes_shares_its_prepared_data(monkeypatch):
    """torchrun on two nodes with one process each: each node's only process prepares its own data and
    writes no file for others (two such nodes on one machine once raced for the same file)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert Processes.from_env().several and not Processes.from_env().share_on_machine
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert Processes.from_env().share_on_machine
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # another launcher: every process counted on one machine
    assert Processes.from_env().share_on_machine


def test_an_optimizer_state_for_other_parameters_is_refused_naming_the_file(tmp_path):
    """Resuming under FSDP from a checkpoint whose optimizer trained other parameters (e.g. the tuning
    changed under --force-resume): one sentence naming the file, before anything is sharded."""
    from vlmtune.training.sharded import load_full_optimizer_state

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    saved = torch.optim.AdamW(model[0].parameters()).state_dict()  # 2 parameters
    optimizer = torch.optim.AdamW(model.parameters())  # 4
    with pytest.raises(ConfigError, match=r"checkpoint-4/optimizer.pt holds the state of 2 parameters and this run "
                                          r"trains 4; resume with the tuning"):
        load_full_optimizer_state(model, optimizer, saved, tmp_path / "checkpoint-4")
