"""Typed configuration: flags from dataclasses, and loud refusal of unknown keys or wrong types."""
import argparse

import pytest

from common.config import add_arguments, describe, field_help, from_args, from_dict
from common.optim import OptimConfig
from worker.model import GPTConfig


def test_flags_roundtrip_with_help_from_comments():
    parser = argparse.ArgumentParser()
    add_arguments(parser, GPTConfig)
    add_arguments(parser, OptimConfig)
    args = parser.parse_args(["--n-layer", "2", "--lr", "0.5", "--optimizer", "sgd"])
    assert from_args(GPTConfig, args) == GPTConfig(n_layer=2)
    assert from_args(OptimConfig, args).lr == 0.5
    assert "attention heads" in field_help(GPTConfig)["n_head"]
    assert "attention heads" in parser.format_help()


def test_from_dict_refuses_unknown_and_wrong_types():
    assert from_dict(GPTConfig, {"n_layer": 3}).n_layer == 3
    assert from_dict(OptimConfig, {"lr": 1}).lr == 1.0          # int is fine for a float field
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['n_layers'\].*accepted: .*n_layer"):
        from_dict(GPTConfig, {"n_layers": 3})
    with pytest.raises(ValueError, match="n_layer must be int, got str"):
        from_dict(GPTConfig, {"n_layer": "3"})
    with pytest.raises(ValueError, match="must be int, got bool"):
        from_dict(GPTConfig, {"n_layer": True})
    with pytest.raises(ValueError, match="expected a mapping"):
        from_dict(GPTConfig, [1, 2])


def test_describe_lists_every_field():
    text = describe({"model": GPTConfig()})
    assert "model:" in text and "n_embd = 128" in text
