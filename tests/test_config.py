"""params.yaml's `models.<name>.train_data`: what the config accepts, how it names a mistake, and the
project's own params (every entry carries it, because dvc.yaml interpolates it into a dependency);
defaults come from params.yaml alone; SEGLAB_TRACE's record of the keys a stage reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic_core import PydanticUndefined

from seglab import config as config_module
from seglab.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def config(models: dict, **sections) -> Config:
    return Config.model_validate({"shard": {"out": "data/shards"},
                                  "validate_synthetic": {"out": "data/synthetic_valid"},
                                  "models": models, **sections})


def test_real_and_validated_synthetic_train_data_resolve_to_their_augmenter():
    cfg = config({
        "real": {"arch": "unet", "train_data": "data/shards"},
        "real_spelt_otherwise": {"arch": "unet", "train_data": "./data/shards/"},
        "unset": {"arch": "unet"},
        "unet+pix2pix": {"arch": "unet", "train_data": "data/synthetic_valid/pix2pix"},
        "unet+dcgan": {"arch": "unet", "train_data": "data/synthetic_valid/dcgan/"},
    }, gan={"names": ["dcgan", "pix2pix"]})
    assert {name: cfg.model(name).gan for name in cfg.models} == {
        "real": None, "real_spelt_otherwise": None, "unset": None, "unet+pix2pix": "pix2pix", "unet+dcgan": "dcgan"}
    assert cfg.model_train_data("unset") == cfg.model_train_data("real") == Path("data/shards")
    assert cfg.model_train_data("unet+pix2pix") == Path("data/synthetic_valid/pix2pix")
    # The resolution survives the copies other code makes.
    assert cfg.model_copy(update={"seed": 3}).model("unet+pix2pix").gan == "pix2pix"


@pytest.mark.parametrize("train_data", [
    "data/synthetic/pix2pix",          # the GAN's output before the validation gate
    "data/synthetic_valid",            # the gate's root, no GAN
    "data/synthetic_valid/stylegan",   # not a GAN of gan.names
    "data/other_shards",
])
def test_any_other_train_data_is_refused_naming_the_key_and_what_is_expected(train_data):
    with pytest.raises(ValueError) as caught:
        config({"unet": {"arch": "unet", "train_data": "data/shards"},
                "bad": {"arch": "unet", "train_data": train_data}})
    message = str(caught.value)
    assert "models.bad.train_data" in message and repr(train_data) in message
    assert "shard.out ('data/shards'" in message and "data/synthetic_valid/pix2pix" in message


def test_a_gan_left_out_of_gan_names_is_refused():
    with pytest.raises(ValueError, match=r"models\.x\.train_data.*gan\.names \(data/synthetic_valid/dcgan:"):
        config({"x": {"arch": "unet", "train_data": "data/synthetic_valid/pix2pix"}}, gan={"names": ["dcgan"]})


def test_load_config_reports_the_train_data_error_on_one_readable_line(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["models"]["unet_mobilenetv2_scratch"]["train_data"] = "data/synthetic/pix2pix"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{path}: invalid settings:"
    assert lines[1].startswith("  models.unet_mobilenetv2_scratch.train_data is 'data/synthetic/pix2pix'; expected shard.out")
    assert len(lines) == 2  # no dump of the whole settings


def test_every_model_in_params_yaml_names_its_train_data_and_an_augmented_variant_mirrors_its_base():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    missing = [name for name, entry in raw["models"].items() if "train_data" not in entry]
    assert not missing, f"dvc.yaml's ${{item.train_data}} needs train_data on {missing}"
    cfg = load_config(REPO / "params.yaml")
    augmented = {name: entry.gan for name, entry in cfg.models.items() if entry.gan}
    assert augmented == {"unet_mobilenetv2_imagenet+pix2pix": "pix2pix"}
    for name, gan in augmented.items():
        base, suffix = name.rsplit("+", 1)
        assert suffix == gan
        # Only the training data differs from the base model, so the two compare class by class.
        assert cfg.model(name).model_dump(exclude={"train_data"}) == cfg.model(base).model_dump(exclude={"train_data"})
        assert cfg.model(base).gan is None


def test_more_models_are_validated_but_outside_the_comparison():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.more_models and not cfg.more_models.keys() & cfg.models.keys()
    name = next(iter(cfg.more_models))
    with pytest.raises(ConfigError, match=rf"{name!r} is in params.yaml `more_models`.*move its entry into `models`"):
        cfg.model(name)
    with pytest.raises(ValueError, match=r"more_models\.bad\.train_data"):
        config({}, more_models={"bad": {"arch": "unet", "train_data": "data/elsewhere"}})
    with pytest.raises(ValueError, match=r"models\.twice is also in more_models"):
        config({"twice": {"arch": "unet"}}, more_models={"twice": {"arch": "unet"}})


def test_a_replicate_entry_overrides_the_seed_and_nothing_else():
    cfg = config({"base": {"arch": "unet", "train_data": "data/shards"},
                  "base_s1": {"arch": "unet", "train_data": "data/shards", "seed": 1}}, seed=7)
    assert (cfg.model_seed("base"), cfg.model_seed("base_s1")) == (7, 1)
    with pytest.raises(ValueError, match=r"models\.bad\.seed"):
        config({"bad": {"arch": "unet", "seed": -1}})


def test_train_class_weights_are_null_a_list_or_median_frequency_and_a_misspelt_mode_names_them(tmp_path):
    for value in (None, [1.0, 2.5], "median_frequency"):
        assert Config.model_validate({"train": {"class_weights": value}}).train.class_weights == value
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"]["class_weights"] = "median_freq"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    lines = str(caught.value).splitlines()
    assert len(lines) == 2 and lines[1].startswith("  train.class_weights: Value error, train.class_weights is "
                                                   "'median_freq'; expected null, a list of one weight per class, "
                                                   "or 'median_frequency'")


# ---- defaults: params.yaml is their one source ----------------------------------------------------


def test_left_out_keys_take_the_project_params_yaml_values():
    params = load_config(REPO / "params.yaml")
    # Everything but the comparison (models, more_models, ensemble), which a settings mapping names itself.
    comparison = {"models", "more_models", "ensemble"}
    assert Config.model_validate({}).model_dump(exclude=comparison) == params.model_dump(exclude=comparison)
    partial = Config.model_validate({"sample": {"train_images": 2}, "train": {"augment": {"hflip": False}}})
    assert partial.sample == params.sample.model_copy(update={"train_images": 2})
    assert partial.train.augment == params.train.augment.model_copy(update={"hflip": False})
    assert partial.train.loss == params.train.loss and partial.run_profile == params.run_profile


@pytest.mark.parametrize("section", [
    config_module.SampleConfig, config_module.DataConfig, config_module.ShardConfig, config_module.ValidateConfig,
    config_module.ProfileConfig, config_module.AugmentConfig, config_module.TrainConfig,
    config_module.EvaluateConfig, config_module.PredictConfig, config_module.WarehouseConfig,
    config_module.ScheduleConfig])
def test_no_section_restates_a_value_of_params_yaml(section):
    restated = {name: field.default for name, field in section.model_fields.items()
                if field.default is not PydanticUndefined and field.default is not None}
    assert not restated, f"{section.__name__} repeats params.yaml's values in code: {restated}"


def test_a_key_the_project_params_yaml_lacks_is_required(tmp_path, monkeypatch):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    del raw["train"]["loss"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setattr(config_module, "PROJECT_PARAMS", path)  # the defaults are this very file
    config_module.project_params.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"train\.loss: Field required"):
            load_config(path)
    finally:
        monkeypatch.undo()
        config_module.project_params.cache_clear()


# ---- SEGLAB_TRACE: which params keys a stage reads -------------------------------------------------


def test_params_reads_records_the_keys_read_and_stops_cleanly():
    from seglab.stage_trace import ParamsReads

    cfg = load_config(REPO / "params.yaml")
    reads = ParamsReads(cfg)
    try:
        cfg.run_profile.epochs
        cfg.model_width("unet_mobilenetv2_scratch")
        assert cfg.model("unet_mobilenetv2_imagenet+pix2pix").gan == "pix2pix"
        cfg.validate_.min_side
        cfg.evaluate.data  # not the top-level `data` section, though named alike
        cfg.train.augment.model_dump()
    finally:
        reads.stop()
    cfg.seed  # after stop(): not recorded
    assert reads.keys == {
        "profile", "profiles.cpu.epochs", "models.unet_mobilenetv2_scratch.width",  # its own width: 1.0
        "models.unet_mobilenetv2_imagenet+pix2pix.train_data",  # `gan` is derived from train_data
        "validate.min_side", "evaluate.data", *(f"train.augment.{k}" for k in cfg.train.augment.model_fields)}
    assert "__getattribute__" not in config_module._Section.__dict__
