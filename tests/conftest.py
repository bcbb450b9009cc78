"""Shared test helpers."""

from __future__ import annotations

import pytest

from hybridvlm.config import LMConfig


def tiny_config(**overrides) -> LMConfig:
    """A tiny LMConfig with all three layer kinds (Mamba-2, attention, MLP).

    Keyword arguments override fields (through `LMConfig.replace`, so a
    misspelt name is an error).
    """
    cfg = LMConfig(
        vocab_size=64,
        hidden_size=32,
        pattern="M-*M*-",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        mamba_num_heads=4,
        mamba_head_dim=8,
        ssm_state_size=8,
        n_groups=2,
        conv_kernel=4,
        chunk_size=4,
    )
    return cfg.replace(**overrides) if overrides else cfg


@pytest.fixture(name="tiny_config")
def tiny_config_fixture():
    """The `tiny_config` factory, as a fixture."""
    return tiny_config
