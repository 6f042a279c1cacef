"""Config loading: typed fields, dotted overrides, and errors that name the field."""

from pathlib import Path

import pytest

from iil_dist import config
from iil_dist.engine.deepspeed_config import deepspeed_config

REPO = Path(__file__).resolve().parents[1]


def test_embedded_default_loads_with_documented_fields():
    """Guards against the shipped recipe drifting out of the schema or a field without a description."""
    cfg = config.load(REPO / "configs" / "digits.yaml")
    assert cfg.data.drift == "rotation" and cfg.dist.num_workers == 2 and cfg.method.name == "dbd"
    lines = config.describe()
    assert all("  # " in line and line.split("  # ", 1)[1].strip() for line in lines)
    assert any(line.startswith("method.ema_alpha = ") for line in lines)


def test_dotted_overrides_are_typed():
    """Guards against overrides arriving as strings or landing in the wrong section."""
    cfg = config.load(
        REPO / "configs" / "digits.yaml", ["method.ema_alpha=0.8", "dist.zero_stage=2", "data.drift=none"]
    )
    assert cfg.method.ema_alpha == 0.8 and cfg.dist.zero_stage == 2 and cfg.data.drift == "none"
    assert config.from_dict({}, ["optim.lr=1"]).optim.lr == 1.0 and isinstance(
        config.from_dict({}, ["optim.lr=1"]).optim.lr, float
    )


@pytest.mark.parametrize(
    ("raw", "overrides", "needle"),
    [
        ({"method": {"ema_alfa": 0.9}}, [], "method.ema_alfa"),
        ({"bogus": 1}, [], "bogus"),
        ({}, ["method.ema_alpha=1.5"], "method.ema_alpha"),
        ({}, ["method.ema_alpha=0"], "method.ema_alpha"),
        ({}, ["optim.batch_size=abc"], "optim.batch_size"),
        ({}, ["optim.batch_size=2.5"], "optim.batch_size"),
        ({}, ["dist.zero_stage=7"], "dist.zero_stage"),
        ({}, ["data.drift=sideways"], "data.drift"),
        ({}, ["method.name=sgd"], "method.name"),
        ({}, ["method.freeze_epochs=30"], "method.freeze_epochs"),
        ({}, ["data.rotation_min_deg=70"], "data.rotation_min_deg"),
        ({}, ["data.drift=subpopulation", "data.hidden_subgroups=3"], "data.hidden_subgroups"),
        ({}, ["data.drift=corruption", "data.blur_min=0.5"], "data.blur_min"),
        ({"data": 3}, [], "data"),
        ({}, ["data.dusting=true"], "data.dusting"),
        ({}, ["method.dusting=maybe"], "method.dusting"),
        ({}, ["tracking.log_every=3", "tracking.print_every=10"], "tracking.print_every"),
    ],
)
def test_bad_values_fail_fast_naming_the_field(raw, overrides, needle):
    """Guards against a typo or impossible value reaching the workers."""
    with pytest.raises(config.ConfigError, match=needle.replace(".", r"\.")):
        config.from_dict(raw, overrides)


def test_file_errors_name_the_file(tmp_path):
    """Guards against an error that hides which recipe is broken."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  ema_alpha: [1\n")
    with pytest.raises(config.ConfigError, match="bad.yaml"):
        config.load(bad)
    with pytest.raises(config.ConfigError, match="missing.yaml"):
        config.load(tmp_path / "missing.yaml")
    bad.write_text("optim:\n  lr: -1\n")
    with pytest.raises(config.ConfigError, match=r"bad\.yaml.*optim\.lr"):
        config.load(bad)


def test_deepspeed_config_is_derived_from_the_tree():
    """Guards against the DeepSpeed JSON disagreeing with the config (batch, clipping, stage)."""
    cfg = config.from_dict({}, ["optim.batch_size=16", "optim.grad_clip=0.5", "dist.zero_stage=1"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 1


def test_scenario_directory_follows_the_scenario_settings():
    """Guards against the plain protocol (or another order) clashing with the prepared default scenario."""
    default = config.load(REPO / "configs" / "digits.yaml")
    assert default.data.scenario_dir == Path("data/digits-rotation-t10-split0-order0")
    plain = config.load(REPO / "configs" / "digits.yaml", ["data.drift=none"])
    other_order = config.load(REPO / "configs" / "digits.yaml", ["data.order_seed=3"])
    assert len({default.data.scenario_dir, plain.data.scenario_dir, other_order.data.scenario_dir}) == 3
    assert config.from_dict({}, ["data.root=/shared/scn"]).data.scenario_dir == Path("/shared/scn")


@pytest.mark.parametrize("recipe", ["cifar100", "imagenet100", "imagenet1k"])
def test_real_dataset_recipes_validate_and_state_resources(recipe):
    """Guards against a shipped recipe that no longer validates, or that does not tell the user what it needs."""
    path = REPO / "configs" / f"{recipe}.yaml"
    cfg = config.load(path)
    assert cfg.dist.use_gpu and cfg.dist.precision == "bf16" and cfg.data.source != "digits"
    assert "Resources expected:" in path.read_text()
    if recipe != "cifar100":
        assert cfg.data.image_size == 0 and cfg.data.train_transform == "resized_crop_flip" and cfg.data.crop_size


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["data.image_size=0"], "data.crop_size"),
        (["data.image_size=0", "data.crop_size=32", "data.train_transform=resized_crop_flip"], "must crop"),
        (["data.source=cifar100"], "data.source_path: required"),
        (["data.shard_url=s3://bucket/x.tar"], "data.shard_url: must contain {file}"),
    ],
)
def test_data_fields_that_must_agree(overrides, needle):
    """Guards against data settings that would fail only inside the workers (unbatchable sizes, no source)."""
    with pytest.raises(config.ConfigError, match=needle.replace(".", r"\.").replace("{", r"\{").replace("}", r"\}")):
        config.load(REPO / "configs" / "digits.yaml", overrides)
