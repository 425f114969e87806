"""GGUF releases (audit.pipeline.release.gguf_file): tiny-llama written and read back, exactly at F32, within a block's rounding
at Q8_0; files that are not GGUF, truncated, or of a type not dequantized here are one line each."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audit.core.errors import AuditError
from audit.data.models import load_model_and_tokenizer
from audit.pipeline.release.gguf_file import SUPPORTED_TYPES, check_qtype, open_gguf, read_gguf, write_gguf

TEXTS = ["code 123456 pin 987654", "a note about the weather, written on Tuesday", "<|endoftext|>secret 0042"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def written(tiny, tmp_path_factory):
    model, tokenizer = tiny
    out = tmp_path_factory.mktemp("gguf")
    return {q: write_gguf(model, tokenizer, out / f"tiny.{q}.gguf", q) for q in ("f32", "q8_0")}


def test_f32_round_trip_gives_bit_identical_weights_and_the_same_token_ids(tiny, written):
    model, tokenizer = tiny
    back = read_gguf(written["f32"].path)
    original, read = model.state_dict(), back.model.state_dict()
    assert set(read) == set(original)
    different = [k for k in original if not torch.equal(original[k], read[k])]
    assert different == []
    assert back.qtype == "f32" and back.pre == "smollm"  # tiny splits digits one per token, as SmolLM2 does
    for text in TEXTS:
        assert back.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text


def test_the_layout_is_llama_cpps_as_transformers_gguf_loader_reads_it(tiny, written):
    """An independent reader (transformers' own GGUF loader, with its own q/k un-permutation) gets the same weights:
    the tensor names and the rotary permutation are llama.cpp's, not only inverses of each other."""
    from transformers import AutoModelForCausalLM

    model, _ = tiny
    path = written["f32"].path
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).state_dict()
    ours = model.state_dict()
    assert [k for k in ours if k in theirs and not torch.equal(ours[k], theirs[k])] == []
    assert set(ours) - set(theirs) <= {"lm_head.weight"}


def test_q8_0_reads_back_within_the_block_rounding(tiny, written):
    """Q8_0 stores 32 weights as int8 q and one fp16 scale d = max|x| / 127: each weight is off by at most d / 2,
    plus the scale's fp16 rounding (2^-11 relative, times |q| <= 127)."""
    model, _ = tiny
    back = read_gguf(written["q8_0"].path)
    assert back.qtype == "q8_0" and back.tensor_types["blk.0.attn_q.weight"] == "Q8_0"
    assert back.tensor_types["blk.0.attn_norm.weight"] == "F32"  # 1-D tensors stay F32, as in llama.cpp
    changed = 0
    for key, w in model.state_dict().items():
        r = back.model.state_dict()[key]
        if w.ndim < 2:
            assert torch.equal(w, r), key
            continue
        blocks, err = w.reshape(-1, 32).numpy(), (w - r).abs().reshape(-1, 32).numpy()
        amax = np.abs(blocks).max(axis=1, keepdims=True)
        assert (err <= amax * (0.5 / 127 + 2 ** -10) + 1e-12).all(), key
        changed += int((err > 0).any())
    assert changed > 0  # quantized, not copied
    assert written["q8_0"].bytes < written["f32"].bytes / 3


def test_an_unsupported_type_is_one_line():
    assert check_qtype("Q4_0") == "q4_0"
    with pytest.raises(AuditError, match="q4_k_m.*not supported") as err:
        check_qtype("q4_k_m")
    assert "\n" not in str(err.value) and all(t in err.value.fix for t in SUPPORTED_TYPES)


def test_a_file_that_is_not_gguf_is_one_line(tmp_path, tiny_model_dir):
    with pytest.raises(AuditError, match="is not a GGUF file") as err:
        read_gguf(tiny_model_dir / "model.safetensors")
    assert "\n" not in str(err.value)
    with pytest.raises(AuditError, match="does not exist"):
        read_gguf(tmp_path / "missing.gguf")


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_a_truncated_file_is_one_line(tmp_path, written, keep):
    data = written["f32"].path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(AuditError, match="truncated") as err:
        read_gguf(cut)
    assert "\n" not in str(err.value)


def test_a_tensor_type_the_reader_does_not_dequantize_is_one_line(tmp_path):
    import gguf

    path = tmp_path / "ternary.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    w = np.ones((4, 256), dtype=np.float32)
    writer.add_tensor("token_embd.weight", gguf.quants.quantize(w, gguf.GGMLQuantizationType.TQ1_0),
                      raw_dtype=gguf.GGMLQuantizationType.TQ1_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(AuditError, match="TQ1_0, which this reader does not dequantize"):
        open_gguf(path)
