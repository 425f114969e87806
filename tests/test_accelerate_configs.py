"""The shipped accelerate configs leave to the recipe what the recipe sets, and use accelerate 1.15's current keys."""

from __future__ import annotations

import warnings
from pathlib import Path

ACCELERATE = Path(__file__).resolve().parent.parent / "recipes" / "accelerate"


def _config(name: str):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(ACCELERATE / name))


def test_zero3_takes_accumulation_and_clipping_from_the_recipe():
    """A hard-coded gradient_accumulation_steps: 1 raised DeepSpeed's config mismatch for any recipe setting another
    value; left out, accelerate passes "auto" and the Trainer fills it from training.gradient_accumulation_steps."""
    ds = _config("zero3.yaml").deepspeed_config
    assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds
    assert ds["zero_stage"] == 3


def test_fsdp_config_uses_reshard_after_forward_not_the_deprecated_sharding_strategy():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import ShardingStrategy

    fsdp = _config("fsdp.yaml").fsdp_config
    assert "fsdp_sharding_strategy" not in fsdp
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plugin = FullyShardedDataParallelPlugin(fsdp_version=fsdp["fsdp_version"],
                                                reshard_after_forward=fsdp["fsdp_reshard_after_forward"])
    assert plugin.reshard_after_forward == ShardingStrategy.FULL_SHARD
    assert not [w for w in caught if "deprecated" in str(w.message)]
