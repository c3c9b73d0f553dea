"""TrainConfig: typed nested sections, preset merging, and a command-line flag for every field."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from medart_core.errors import ConfigError
from medart_core.hldf import HLDFConfig
from medart_core.lora import LoRAConfig
from medart_core.commands.train import add_train_arguments, config_from_args
from medart_core.train_config import SECTION_CLASSES, SECTIONS, TrainConfig, merge_config


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    return p.parse_args(list(argv))


def test_every_field_has_a_flag():
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    flags = {s for a in p._actions for s in a.option_strings}
    for f in dataclasses.fields(TrainConfig):
        if f.name in SECTIONS:
            continue
        assert f"--{f.name.replace('_', '-')}" in flags and f"--{f.name}" in flags
    assert set(SECTIONS) == {"lora", "hldf", "ema"}
    for section in SECTIONS:
        for f in dataclasses.fields(SECTION_CLASSES[section]):
            assert f"--{section}.{f.name}" in flags and f"--{section}.{f.name.replace('_', '-')}" in flags


def test_flags_override_the_preset_without_a_json_file():
    cfg = config_from_args(_parse("--preset", "cpu-smoke", "--lora.rank", "3", "--hldf.pixel-every", "50",
                                  "--hldf.grad_path", "truncated", "--max-steps", "7", "--lr", "5e-5",
                                  "--validation-seeds", "1,2", "--cache-features", "false", "--lora.t5-enabled",
                                  "false", "--resolution", "none", "--hldf.color_weight", "0.5"))
    assert isinstance(cfg.lora, LoRAConfig) and isinstance(cfg.hldf, HLDFConfig)
    assert (cfg.lora.rank, cfg.lora.t5_enabled) == (3, False)
    assert cfg.lora.alpha == 4.0, "fields not given keep the preset's value (sections merge field by field)"
    assert (cfg.hldf.pixel_every, cfg.hldf.grad_path, cfg.hldf.color_weight) == (50, "truncated", 0.5)
    assert cfg.hldf.sample_steps == 3
    assert (cfg.max_steps, cfg.lr, cfg.validation_seeds, cfg.resolution) == (7, 5e-5, [1, 2], None)
    assert TrainConfig.from_json(cfg.to_json()) == cfg


def test_bad_flag_values_are_refused():
    with pytest.raises(SystemExit):
        _parse("--hldf.grad-path", "sideways")
    with pytest.raises(SystemExit):
        _parse("--cache-features", "maybe")
    with pytest.raises(ConfigError, match="pixel_every"):
        config_from_args(_parse("--hldf.pixel-every", "0"))


def test_nested_sections_merge_and_unknown_keys_are_refused():
    d = merge_config({"lora": {"rank": 8, "alpha": 8.0}}, {"lora": {"rank": 2}})
    assert d["lora"] == {"rank": 2, "alpha": 8.0}
    cfg = TrainConfig.from_preset("cpu-smoke", lora={"rank": 2}, max_steps=3)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.max_steps) == (2, 4.0, 3)
    with pytest.raises(ConfigError, match="Unknown LoRA config keys"):
        TrainConfig.from_dict({"lora": {"rnak": 2}})
    with pytest.raises(ConfigError, match="Unknown HLDF config keys"):
        TrainConfig.from_dict({"hldf": {"pixel_evry": 2}})
