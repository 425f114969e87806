"""`audit measure --model model.gguf`: a release in llama.cpp's format measured like any fine-tune (tiny-llama).

Refused in one line, exit 2, nothing written: a file that is not GGUF, a truncated one, one whose tensor types the
reader does not dequantize, a model of another shape. Measured: a GGUF's weights dequantized into fp32, its tokenizer
from the file's metadata checked against the base's by hash."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import measure_refused, other_shape_model, perturbed_copy

from audit.cli import main


@pytest.fixture
def gt(injected, in_tmp, monkeypatch) -> Path:  # noqa: F811 - the imported fixture
    monkeypatch.setenv("CANARY_AUDIT_CACHE", str(in_tmp.parent / "cache"))  # the GGUF's fp32 copies, kept out of ~/.cache
    path = in_tmp / "gt"
    shutil.copytree(injected, path)
    return path


def _gguf(model_dir: Path, out: Path, qtype: str) -> Path:
    from audit.data.ground_truth import load_tokenizer
    from audit.pipeline.release.gguf_file import write_gguf

    return write_gguf(model_dir, load_tokenizer(model_dir), out, qtype).path


def test_measure_refuses_a_file_that_is_not_gguf(gt, capsys):
    (gt.parent / "model.gguf").write_bytes(b"PK\x03\x04 not a gguf file")
    measure_refused(["gt", "--model", "model.gguf"], capsys, "model.gguf is not a GGUF file", root=gt.parent)


def test_measure_refuses_a_truncated_gguf(gt, capsys, tiny_model_dir, tmp_path):
    whole = _gguf(tiny_model_dir, tmp_path / "whole.gguf", "f32").read_bytes()
    (gt.parent / "cut.gguf").write_bytes(whole[: len(whole) * 2 // 3])
    measure_refused(["gt", "--model", "cut.gguf"], capsys, "cut.gguf is truncated", root=gt.parent)


def test_measure_refuses_a_gguf_of_a_type_it_cannot_dequantize(gt, capsys):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(gt.parent / "ternary.gguf"), "llama")
    tq = gguf.GGMLQuantizationType.TQ2_0
    writer.add_tensor("token_embd.weight", gguf.quants.quantize(np.ones((2, 256), dtype=np.float32), tq), raw_dtype=tq)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    measure_refused(["gt", "--model", "ternary.gguf"], capsys, "TQ2_0, which this reader does not dequantize", root=gt.parent)


def test_measure_refuses_a_gguf_of_another_shape_and_caches_nothing(gt, capsys, tiny_model_dir, tmp_path):
    _gguf(other_shape_model(tmp_path / "narrow", tiny_model_dir), gt.parent / "narrow.gguf", "f32")
    measure_refused(["gt", "--model", "narrow.gguf"], capsys,
                    "--model narrow.gguf is not a fine-tune of the base tiny-llama: its "
                    "tensor model.embed_tokens.weight is [512, 32], the base's [512, 64]", root=gt.parent)
    assert not [p for p in (gt.parent.parent / "cache" / "models").glob("*") if p.name.startswith("gguf")]


def test_measure_reads_a_gguf_release_like_a_fine_tune(gt, tmp_path):
    from audit.data.models import sha256_file
    from audit.report import read_report

    tuned = perturbed_copy(tmp_path / "tuned")
    path = _gguf(tuned, gt.parent / "tuned.q8_0.gguf", "q8_0")
    assert main(["measure", "gt", "--model", "tuned.q8_0.gguf", "--no-tracking", "--quiet", "--no-fail-on-gates"]) == 0
    (run_dir,) = (gt.parent / "runs").glob("*-measure-*")
    report = read_report(run_dir / "report.json")
    (node,) = [n for n in report.lineage if n.kind == "tuned_weights"]
    assert node.details["training"] == "external" and node.details["model"] == str(path.resolve())
    record = json.loads((run_dir / "external.json").read_text())
    assert record["gguf_sha256"] == sha256_file(path) and record["gguf_type"] == "q8_0"
    assert {"exposure.mean/rep_16/tuned", "exposure.mean/rep_0/tuned"} <= set(report.flat_metrics())
