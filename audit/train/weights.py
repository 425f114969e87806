"""Put saved fine-tuned weights onto a base model: the one function that does it (:func:`load_tuned`).

Every consumer of tuned weights goes through here: a resumed run (the train stage on disk), rank 0 after a
distributed run (the sharded model cannot run a forward pass on one process), a further tune (the parent's chain
of adapters merged into the base before training again), and ``audit probe``. Torch and peft are imported lazily.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from audit.train.types import DeviceChoice, WeightsLayer


def load_tuned(base: Any, layers: Sequence[WeightsLayer], *, device: DeviceChoice, trust_remote_code: bool = False,
               keep_last_adapter: bool = True) -> Any:
    """``base`` with each layer applied in turn, in eval mode.

    A LoRA layer is put on the model below it (``PeftModel.from_pretrained``); every adapter but the last is then
    merged in (``merge_and_unload``), so the next layer sees plain weights. ``keep_last_adapter=False`` merges the
    last one too (a further tune trains a fresh adapter on top); merges run in fp32 and the result is cast to the run's
    load dtype (a no-op in fp32 and the mixed modes). A full layer replaces the model (safetensors, read straight onto
    the device): the layers below the last full one are not applied, and with a full layer first ``base`` may be None,
    so no base is loaded only to be replaced. ``base`` is consumed: merging rewrites its layers in place.
    """
    last_full = max((i for i, layer in enumerate(layers) if layer.method == "full"), default=None)
    if last_full is not None:
        layers = layers[last_full:]  # what a full layer replaces does not matter
    model = base
    assert model is not None or layers[0].method == "full", "a LoRA layer needs the model below it"
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        if layer.method == "lora":
            from peft import PeftModel

            if last and keep_last_adapter:
                model = PeftModel.from_pretrained(model, str(layer.path))
            else:  # merged in fp32: folded into bf16 weights the fp32 delta would round to the bf16 spacing (~4e-3
                # relative) and the start weights would differ from the model that was scored; back to the run's dtype after
                import torch

                merged = PeftModel.from_pretrained(model.to(torch.float32), str(layer.path)).merge_and_unload()
                model = merged.to(device.torch_dtype)
        else:  # the model only: a model trained elsewhere may be saved without its tokenizer (audit measure)
            from audit.data.models import load_causal_lm

            model = base = None  # the model below is dropped (here at least) before the next one is read
            model = load_causal_lm(layer.path, dtype=device.torch_dtype, device=device.device,
                                   trust_remote_code=trust_remote_code)
    model.eval()
    return model
