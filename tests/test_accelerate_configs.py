"""The shipped accelerate configs leave to the recipe what the recipe sets, use accelerate 1.16's current keys, and
FSDP2 trains and saves in fp32 what unsharded processes compute (over gloo on CPU)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

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


def _launch_env(name: str) -> dict[str, str]:
    """The FSDP / accelerate variables ``accelerate launch --config_file recipes/accelerate/NAME`` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(ACCELERATE / name), "x.py"]))
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("FSDP_", "ACCELERATE_"))}


def _fsdp_plugin(monkeypatch):
    """The plugin the Trainer's Accelerator builds from the launcher's variables, with the bf16 policy accelerate derives
    from ``TrainingArguments.bf16`` (AcceleratorState calls ``set_mixed_precision`` on GPU machines)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    for k, v in _launch_env("fsdp.yaml").items():
        monkeypatch.setenv(k, v)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plugin = FullyShardedDataParallelPlugin()
    assert not [w for w in caught if "deprecat" in str(w.message).lower() or "obsolete" in str(w.message).lower()]
    plugin.set_mixed_precision("bf16")
    return plugin


def test_fsdp_config_is_fsdp2_and_saves_one_full_state_dict(monkeypatch):
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.fsdp.fully_sharded_data_parallel import StateDictType

    plugin = _fsdp_plugin(monkeypatch)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT  # Trainer.save_model gathers it: one safetensors model
    assert not plugin.cpu_ram_efficient_loading  # else processes other than local rank 0 would score empty weights
    assert plugin.mixed_precision_policy == MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)


def test_the_audit_takes_the_bf16_policy_off_so_fsdp_keeps_fp32_and_autocast_does_the_rest(monkeypatch):
    from types import SimpleNamespace

    from audit.train.distributed import fsdp_without_casts

    plugin = _fsdp_plugin(monkeypatch)
    fsdp_without_casts(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))
    assert plugin.mixed_precision_policy is None  # accelerate's fsdp2_prepare_model then uses MixedPrecisionPolicy()
    fsdp_without_casts(SimpleNamespace(state=SimpleNamespace()))  # no FSDP (one process, DDP): nothing to change


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp2_rank(rank: int, world: int, port: int, env: dict[str, str], model_dir: str, out: str) -> None:
    """One process of FSDP2 over gloo: accelerate's own fsdp2_prepare_model on tiny-llama, one bf16-autocast step on
    this rank's half of a batch, once under the audit's policy and once under accelerate's bf16 policy; compared with
    the same step computed unsharded in this process (DDP's arithmetic: fp32 weights, autocast, fp32 mean of gradients)."""
    import copy

    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from audit.data.models import load_model_and_tokenizer
    from audit.train.distributed import fsdp_without_casts

    os.environ.update(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")  # makes the gloo process group
    # accelerate enables FSDP only on GPU-like devices (AcceleratorState: a CPU run stays MULTI_CPU, i.e. DDP), so the
    # plugin is handed to the state as the GPU path does; everything after is accelerate's and torch's FSDP2 code
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    batch = torch.randint(3, 500, (world, 24), generator=torch.Generator().manual_seed(7))
    lr, result = 0.5, {}

    def step(model, rows):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=rows, labels=rows).loss.backward()

    for policy in ("audit", "accelerate"):
        accelerator.state.fsdp_plugin.set_mixed_precision("bf16", override=True)
        if policy == "audit":
            fsdp_without_casts(accelerator)
        model, _ = load_model_and_tokenizer(model_dir, dtype=torch.float32, device="cpu")
        model.train()
        reference = copy.deepcopy(model)
        for r in range(world):  # the gradient DDP ends with: the fp32 mean of each process's own gradient
            step(reference, batch[r:r + 1])
        expected = {n: (p - lr * p.grad / world).detach() for n, p in reference.named_parameters()}
        model = fsdp2_prepare_model(accelerator, model)
        sharded = {type(p).__name__ for p in model.parameters()}, {str(p.dtype) for p in model.parameters()}
        step(model, batch[rank:rank + 1])
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad  # the sharded update of the fp32 master copy
        saved = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        buffers = sorted({str(b.dtype) for b in model.buffers()})
        if rank == 0:
            worst = max(((saved[n] - w).abs().max() / w.abs().max()).item() for n, w in expected.items())
            result[policy] = {"sharded": sorted(sharded[0]), "params": sorted(sharded[1]), "buffers": buffers,
                              "saved": sorted({str(t.dtype) for t in saved.values()}), "worst": worst,
                              "missing": sorted(set(expected) - set(saved))}
    if rank == 0:
        Path(out, "fsdp2.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # ~45 s on the shared 2-core machine: two processes import torch, transformers and accelerate
def test_fsdp2_over_gloo_trains_and_saves_fp32_what_unsharded_processes_compute(tiny_model_dir, tmp_path):
    """The launcher's FSDP2 settings, accelerate's fsdp2_prepare_model and torch's fully_shard, on CPU: under the
    audit's policy the sharded parameters are fp32 DTensors, buffers stay fp32, and the gathered state dict after one
    step is fp32 and equals the unsharded step to float rounding; under accelerate's bf16 policy it does not."""
    import torch.multiprocessing as mp

    mp.spawn(_fsdp2_rank, args=(2, _free_port(), _launch_env("fsdp.yaml"), str(tiny_model_dir), str(tmp_path)), nprocs=2,
             join=True)
    result = json.loads((tmp_path / "fsdp2.json").read_text())
    ours, bf16 = result["audit"], result["accelerate"]
    assert ours["sharded"] == ["DTensor"] and ours["params"] == ours["saved"] == ours["buffers"] == ["torch.float32"]
    assert not ours["missing"] and ours["worst"] < 1e-6, ours  # measured: 0.0, bit for bit
    assert bf16["saved"] == ["torch.float32"] and bf16["worst"] > 1e-4, bf16  # the policy is what makes the difference
