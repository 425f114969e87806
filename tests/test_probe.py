"""`audit probe`: per-token probabilities under base and tuned weights (tiny-llama)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from audit.cli import main
from audit.core.errors import AuditError
from audit.pipeline.probe import format_probe, probe_text, resolve_tuned
from audit.score.engine import torch_threads

TEXT = "the vault code is 481927"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):  # tiny-model ops: a second OpenMP thread only waits on a shared 2-core machine
        yield


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter with random (non-zero) weights, saved as safetensors."""
    from peft import LoraConfig, get_peft_model

    from audit.data.models import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def test_base_only_probabilities_match_the_engine(tiny_model, tiny_model_dir):
    model, tok = tiny_model
    result = probe_text(TEXT, model_source=str(tiny_model_dir))
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # plain transformers, one unpadded sequence: ln p of tokens 2..n
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
    expected = lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    assert result.tokens[0].p_base is None and result.tuned_label is None
    assert [t.p_base for t in result.tokens[1:]] == pytest.approx([math.exp(x) for x in expected], rel=1e-4)
    assert "".join(t.text for t in result.tokens) == TEXT
    assert "".join(w.text for w in result.words) == TEXT
    assert result.bits_base == pytest.approx(-sum(expected) / math.log(2), rel=1e-4)
    assert result.raw_bits == 8 * len(TEXT)


def test_words_multiply_their_tokens(tiny_model_dir):
    result = probe_text(TEXT, model_source=str(tiny_model_dir))
    # the last word is made of the tokens after the last whitespace-led token
    start = max(i for i, t in enumerate(result.tokens) if t.text[:1].isspace())
    product = math.prod(t.p_base for t in result.tokens[start:])
    assert result.words[-1].p_base == pytest.approx(product, rel=1e-9)


def test_adapter_is_compared_with_its_own_base(tiny_model_dir, adapter_dir):
    plain = probe_text(TEXT, model_source=str(tiny_model_dir))
    result = probe_text(TEXT, model_source=str(tiny_model_dir), adapter=str(adapter_dir))
    assert [t.p_base for t in result.tokens[1:]] == pytest.approx([t.p_base for t in plain.tokens[1:]], rel=1e-5)
    assert [t.p_tuned for t in result.tokens[1:]] != pytest.approx([t.p_base for t in result.tokens[1:]], rel=1e-3)
    assert result.bits_tuned is not None
    text = format_probe(result)
    assert "p tuned" in text and "memorized" in text and "'-'" not in text.splitlines()[3]


def test_run_directory_supplies_the_base_model(tmp_path, tiny_model_dir, adapter_dir):
    import shutil

    run = tmp_path / "runs" / "r1"
    shutil.copytree(adapter_dir, run / "adapter")
    (run / "recipe.yaml").write_text(f"model:\n  source: {tiny_model_dir}\n")
    found = resolve_tuned(str(run))
    assert (found.kind, found.path, found.base_source) == ("adapter", run / "adapter", str(tiny_model_dir))
    assert resolve_tuned(str(tiny_model_dir)).kind == "model"


def test_bad_paths_are_refused(tmp_path):
    with pytest.raises(AuditError, match="not a directory"):
        resolve_tuned(str(tmp_path / "missing"))
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(AuditError, match="pickle"):
        resolve_tuned(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AuditError, match="no tuned weights"):
        resolve_tuned(str(empty))


def test_cli_probe_json_and_errors(tiny_model_dir, adapter_dir, capsys):
    assert main(["probe", TEXT, "--model", str(tiny_model_dir), "--adapter", str(adapter_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["text"] == TEXT and data["tokens"][0]["p_base"] is None and data["bits_tuned"] > 0
    assert main(["probe", TEXT, "--model", str(tiny_model_dir), "--adapter", "/nonexistent/run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --adapter /nonexistent/run is not a directory")


def test_the_bits_difference_states_its_sign_and_unit():
    """'memorized -38.4' read as memorization; the line now says base - tuned, in bits, and what the sign means."""
    from audit.pipeline.probe import ProbeResult, ProbeToken

    tokens = [ProbeToken("a", None, None), ProbeToken(" b", 0.5, 0.25)]

    def line(base: float, tuned: float) -> str:
        result = ProbeResult(text="a b", base_label="m", tuned_label="run", tokens=tokens, words=tokens, bits_base=base,
                             bits_tuned=tuned, raw_bits=24)
        return format_probe(result).splitlines()[-1]

    assert "base - tuned = -38.4 bits (the tuned model finds this text less likely than the base" in line(10.0, 48.4)
    assert "base - tuned = +6.0 bits (the tuned model finds this text more likely" in line(10.0, 4.0)
