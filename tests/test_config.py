"""Validation of ``RASConfig`` and ``TransformConfig`` (rasfx/config.py, rasfx/transform.py): a
bad value raises ``ConfigError`` (a ``ValueError``) naming the field; edge values are accepted
and normalised; run-length checks happen when the run starts (``step_kinds``).
"""

from __future__ import annotations


import numpy as np
import pytest

import rasfx
from rasfx.sampler import step_kinds



NAN, INF = float("nan"), float("inf")


BAD_CONFIGS = [
    ("ratio", 0), ("ratio", 0.0), ("ratio", 1.5), ("ratio", -1), ("ratio", NAN), ("ratio", INF), ("ratio", "0.5"),
    ("ratio", True), ("ratio", None),
    ("metric", "unknown"), ("metric", "STD"), ("metric", None),
    ("starvation_scale", -0.1), ("starvation_scale", NAN), ("starvation_scale", INF),
    ("warmup", 0), ("warmup", -1), ("warmup", 1.5), ("warmup", True), ("warmup", "4"),
    ("reset_steps", (-1,)), ("reset_steps", (3, -2)), ("reset_steps", (1.5,)), ("reset_steps", (True,)),
    ("reset_steps", "12"), ("reset_steps", 12),
    ("schedule", "linear"),
    ("dynamic_range", 1.0), ("dynamic_range", -0.1), ("dynamic_range", NAN),
    ("high_ratio", 1.5), ("high_ratio", -0.1), ("high_ratio", NAN),
    ("round_to", 0), ("round_to", -4), ("round_to", 2.0),
    ("seed", 1.5), ("seed", None),
]


@pytest.mark.parametrize("field, value", BAD_CONFIGS, ids=[f"{f}={v!r}" for f, v in BAD_CONFIGS])
def test_invalid_config_values_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError) as e:
        rasfx.RASConfig(**{field: value})
    assert isinstance(e.value, rasfx.ConfigError)
    assert f"RASConfig.{field}" in str(e.value) and repr(value) in str(e.value)
    with pytest.raises(rasfx.ConfigError, match=f"RASConfig.{field}"):  # replace() validates again
        rasfx.RASConfig().replace(**{field: value})


def test_valid_config_edge_values_are_accepted_and_normalised():
    cfg = rasfx.RASConfig(ratio=1, warmup=np.int64(1), reset_steps=[5, 2, 5], round_to=1, high_ratio=0,
                          dynamic_range=0, starvation_scale=0, seed=np.int32(3))
    assert cfg.ratio == 1.0 and isinstance(cfg.ratio, float)
    assert cfg.warmup == 1 and type(cfg.warmup) is int and cfg.seed == 3 and type(cfg.seed) is int
    assert cfg.reset_steps == (2, 5)
    assert rasfx.RASConfig(ratio=1e-9).ratio == 1e-9 and rasfx.RASConfig(reset_steps=()).reset_steps == ()


def test_reset_steps_beyond_the_run_raise_at_run_time_naming_the_field():
    cfg = rasfx.RASConfig(reset_steps=(3, 8))
    assert len(step_kinds(cfg, 9)) == 9  # fits a 9-step run
    with pytest.raises(ValueError) as e:
        step_kinds(cfg, 8)
    assert isinstance(e.value, rasfx.ConfigError)
    assert "RASConfig.reset_steps" in str(e.value) and "8-step run" in str(e.value) and "[8]" in str(e.value)
    with pytest.raises(ValueError, match="number of denoising steps"):
        step_kinds(cfg, 0)


def test_warmup_longer_than_the_run_is_all_dense_not_an_error():
    """Documented behaviour (not an error): warm-up covers the whole run, every step is dense."""
    assert step_kinds(rasfx.RASConfig(warmup=50, reset_steps=()), 6) == (False,) * 6


BAD_TRANSFORM_CONFIGS = [
    ("max_captures", 0), ("max_captures", -1), ("max_captures", 1.5), ("mode", "fast"), ("mode", None),
    ("fuse", "yes"), ("fuse", None), ("image_input", ""), ("image_input", 3),
]


@pytest.mark.parametrize("field, value", BAD_TRANSFORM_CONFIGS, ids=[f"{f}={v!r}" for f, v in BAD_TRANSFORM_CONFIGS])
def test_invalid_transform_config_raises_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError) as e:
        rasfx.TransformConfig(**{field: value})
    assert isinstance(e.value, rasfx.ConfigError) and field in str(e.value)
