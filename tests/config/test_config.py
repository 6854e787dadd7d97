"""The typed config: overrides, every problem reported at once with the key named, example configs load."""

from pathlib import Path

import pytest

from vlmtune.config import ConfigError, load_config, valid_keys

BASE = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "output": {"dir": "o"}}
EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))

PUBLIC_KEYS = """model.path model.vision model.llm model.projector data.train data.eval data.images_root data.max_length
data.loss_on tune.vision tune.projector tune.llm tune.lora.r tune.lora.alpha tune.lora.dropout tune.lora.targets
tune.lr.vision tune.lr.projector tune.lr.llm train.epochs train.max_steps train.batch_size train.grad_accum train.lr
train.warmup_ratio train.weight_decay train.seed train.precision train.gradient_checkpointing train.logging_steps
train.save_steps train.save_total_limit output.dir""".split()


def test_public_keys_exist():
    assert set(PUBLIC_KEYS) <= set(valid_keys())


def test_overrides_are_typed():
    cfg = load_config(tree=BASE, overrides=["tune.llm=lora", "train.lr=2e-5", "tune.lora.targets={llm: [q_proj]}",
                                            "data.train=[a.jsonl, b.jsonl]", "train.gradient_checkpointing=true"])
    assert cfg.tune.llm == "lora" and cfg.train.lr == 2e-5 and cfg.tune.lora.targets == {"llm": ["q_proj"]}
    assert cfg.data.train == ["a.jsonl", "b.jsonl"] and cfg.train.gradient_checkpointing is True
    assert cfg.tune.vision == "frozen" and cfg.tune.lr.llm is None


def test_every_problem_names_its_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {path: m, vision: v}\ndata: {train: t.jsonl, loss_on: everything}\n"
                    "tune: {lr: {vison: 1e-4}}\ntrain: {lr: fast}\noutput: {dir: o}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.batchsize=4"])
    message = str(err.value)
    assert message.startswith(f"{path}: 5 problem(s)")
    for expected in ("`model`: give either `model.path` or `model.vision` + `model.llm`, not both",
                     "`data.loss_on`: Input should be 'assistant', 'last_turn' or 'all' (got 'everything')",
                     "unknown key `tune.lr.vison`; did you mean `tune.lr.vision`?",
                     "`train.lr`: Input should be a valid number",
                     "unknown key `train.batchsize`; did you mean `train.batch_size`?"):
        assert expected in message


def test_missing_sections_and_sources():
    with pytest.raises(ConfigError) as err:
        load_config(tree={"model": {"vision": "v"}})
    message = str(err.value)
    assert "missing: model.llm" in message and "missing required key `data`" in message
    assert "missing required key `output`" in message
    with pytest.raises(ConfigError, match="every component is frozen"):
        load_config(tree=BASE, overrides=["tune.projector=frozen", "tune.llm=frozen"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(tree=BASE, overrides=["tune.llm"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/file.yaml")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_configs_load(path):
    cfg = load_config(path)
    assert cfg.output.dir


@pytest.mark.parametrize("override,expected", [
    ("train.seed=-1", "`train.seed`: Input should be greater than or equal to 0 (got -1)"),
    ("train.seed=4294967296", "`train.seed`: Input should be less than or equal to 4294967295"),
    ("train.epochs=.inf", "`train.epochs`: Input should be a finite number (got inf)"),
    ("train.lr=.inf", "`train.lr`: Input should be a finite number"),
    ("train.weight_decay=.inf", "`train.weight_decay`: Input should be a finite number"),
    ("tune.lora.alpha=.inf", "`tune.lora.alpha`: Input should be a finite number"),
    ("train.lr=.nan", "`train.lr`: Input should be a finite number"),
    ("data.num_workers=1000000", "`data.num_workers`: Input should be less than or equal to 64"),
    ("tune.lr.projector=true", "`tune.lr.projector`: expected a number, got a boolean (got True)"),
    ("train.batch_size=true", "`train.batch_size`: expected a number, got a boolean"),
    ("data.train=[]", "`data.train`: List should have at least 1 item after validation, not 0"),
])
def test_values_that_would_break_the_run_are_refused(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(tree=BASE, overrides=[override])
    assert expected in str(err.value)


def test_booleans_still_work_where_booleans_belong():
    cfg = load_config(tree=BASE, overrides=["data.skip_bad=true", "train.seed=4294967295", "train.epochs=2"])
    assert cfg.data.skip_bad is True and cfg.train.seed == 2**32 - 1 and cfg.train.epochs == 2.0


@pytest.mark.parametrize("typed,suggested", [("train.learning_rate", "train.lr"),
                                             ("train.num_train_epochs", "train.epochs"),
                                             ("train.gradient_accumulation_steps", "train.grad_accum"),
                                             ("tune.lora.lora_alpha", "tune.lora.alpha"),
                                             ("data.image_folder", "data.images_root"),
                                             ("output.output_dir", "output.dir")])
def test_names_from_other_tools_suggest_ours(typed, suggested):
    with pytest.raises(ConfigError) as err:
        load_config(tree=BASE, overrides=[f"{typed}=1"])
    assert f"unknown key `{typed}`; did you mean `{suggested}`?" in str(err.value)


def test_malformed_yaml_in_an_override_names_it():
    with pytest.raises(ConfigError) as err:
        load_config(tree=BASE, overrides=["tune.lora.targets={llm: [q_proj"])
    assert str(err.value).startswith("override `tune.lora.targets={llm: [q_proj`: the value is not valid YAML (")
