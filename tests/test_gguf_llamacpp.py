"""llama.cpp itself loads the GGUF files the project writes and computes what the project's reader computes
(benchmarks/gguf_llamacpp.py). The check needs node and `npm i -E node-llama-cpp@3.21.1`, which CI does not have:
without them the slow test skips and the script says so in one line, exit 2."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gguf_llamacpp  # noqa: E402


def test_without_node_llama_cpp_the_script_says_how_to_install_it_and_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(gguf_llamacpp.PREFIX_ENV, raising=False)
    monkeypatch.setattr(gguf_llamacpp, "HERE", tmp_path)
    monkeypatch.setattr(gguf_llamacpp, "ROOT", tmp_path)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/node")
    out = tmp_path / "out.json"
    assert gguf_llamacpp.main(["--prefix", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("node-llama-cpp is not installed") and "npm i -E --prefix" in line
    assert "node-llama-cpp@3.21.1" in line and not out.exists()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert gguf_llamacpp.missing(tmp_path).startswith("node is not installed")


@pytest.mark.slow
def test_llama_cpp_loads_tiny_llamas_gguf_files_and_agrees_with_the_reader(tmp_path):
    problem = gguf_llamacpp.missing()
    if problem:
        pytest.skip(problem)
    out = tmp_path / "tiny.json"
    code = gguf_llamacpp.main(["--model", "tiny-llama", "--types", "f32,q8_0", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [f["type"] for f in result["files"]] == ["f32", "q8_0"]
    for f in result["files"]:
        assert f["loaded"], f.get("error")
        assert f["metadata"]["tokenizer_pre"] == "smollm" and not f["metadata"]["prepends_bos"]
        assert all(t["ids_equal"] and t["gguf_reader_tokenizer_equal"] for t in f["tokens"])
    exact = result["files"][0]["runs"]["exact"]["summary"]
    assert exact["greedy_equal"] == exact["prompts"] == len(gguf_llamacpp.PROMPTS)
    assert exact["logprob_abs_diff_nats"]["max"] <= gguf_llamacpp.F32_TOLERANCE
    assert code == 0 and result["all_agree"]
