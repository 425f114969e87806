"""New-token canaries (Panda et al. 2025, ``new`` design): secrets made of tokens added to the vocabulary, whose
embedding rows start at the mean row (so the base model is nearly indifferent among them) and are trained by LoRA
through PEFT ``trainable_token_indices``. Hand-made pools and the real tiny-llama tokenizer pin the spec; a tiny audit
shows the rows are trained, saved with the adapter, put back on a fresh base identically, and leave every old row alone."""

from __future__ import annotations

import json

import pytest

from audit.cli import main
from audit.core.errors import AuditError
from audit.data.canaries import added_tokens, generate_canaries, load_spec, spec_needs_model
from audit.data.canaries.base import GenerationContext
from audit.data.canaries.tokens import new_token_pool
from audit.data.models import extend_tokenizer


def test_the_pool_is_numbered_bracketed_tokens_and_the_space_is_pool_to_the_length():
    assert new_token_pool(3) == ["<|c0000|>", "<|c0001|>", "<|c0002|>"]
    assert new_token_pool(12_000)[-1] == "<|c11999|>" and len(set(new_token_pool(12_000))) == 12_000
    spec = load_spec("new_tokens", {"pool": 4, "length": 2})
    assert added_tokens(spec) == new_token_pool(4) and added_tokens(load_spec("rare_tokens")) == []
    assert not spec_needs_model(spec)  # model-free: the pool is a fixed list
    drawn = generate_canaries(spec, seed=0, tiers=[1], members_per_tier=1, references=1)
    assert drawn.space.alphabet == new_token_pool(4) and drawn.space.size == 16 and drawn.space.separator == ""
    for c in drawn.canaries:  # two tokens of the pool, written back to back
        assert len(c.secret) == 18 and c.secret[:9] in new_token_pool(4) and c.secret[9:] in new_token_pool(4)
    again = generate_canaries(spec, seed=0, tiers=[1], members_per_tier=1, references=1)
    assert [c.secret for c in again.canaries] == [c.secret for c in drawn.canaries]
    assert load_spec("new_tokens").params["pool"] == 1024 and drawn.space.log2_size == 4.0


def test_the_base_gets_the_same_rows_at_the_mean_on_every_load_and_each_secret_is_its_tokens(tiny_model_dir):
    import torch

    from audit.data.models import load_model_and_tokenizer

    pool = new_token_pool(8)
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu", added_tokens=pool)
    again, _ = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu", added_tokens=pool)
    plain, plain_tok = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu")
    old = plain.get_input_embeddings().weight.shape[0]
    ids = tokenizer.convert_tokens_to_ids(pool)
    assert ids == list(range(len(plain_tok), len(plain_tok) + 8)) and model.get_input_embeddings().weight.shape[0] == old + 8
    rows = model.get_input_embeddings().weight.detach()
    assert torch.equal(rows, again.get_input_embeddings().weight.detach())  # deterministic: base, train, reload agree
    assert torch.equal(rows[:old], plain.get_input_embeddings().weight.detach())  # the old rows untouched
    known = rows[:old]
    offset = (rows[ids] - known.mean(dim=0)).abs() / known.std(dim=0)
    assert offset.max() < 6e-3 and offset.max() > 0  # mean row plus a 1e-3-std jitter: near, never exactly equal
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # still tied
    assert extend_tokenizer(tokenizer, pool) == ids and len(tokenizer) == len(plain_tok) + 8  # idempotent
    # the base model is nearly indifferent among the new tokens: their log-probabilities after any prefix are alike
    prefix = tokenizer("The vault code is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logp = model(prefix).logits[0, -1].log_softmax(-1)[ids]
    assert float(logp.max() - logp.min()) < 0.05
    spec = load_spec("new_tokens", {"pool": 8, "length": 4})
    canaries = generate_canaries(spec, seed=1, tiers=[1], members_per_tier=2, references=4,
                                 context=GenerationContext(tokenizer=tokenizer))
    for c in canaries.canaries:
        got = tokenizer(c.secret, add_special_tokens=False)["input_ids"]
        assert got == [ids[pool.index(c.secret[i:i + 9])] for i in range(0, 36, 9)]


def test_a_tokenizer_without_the_tokens_or_with_one_as_an_ordinary_word_is_refused(tiny_model):
    _, tokenizer = tiny_model
    with pytest.raises(AuditError, match="lacks the added token '<\\|c0000\\|>'"):
        generate_canaries(load_spec("new_tokens"), seed=0, context=GenerationContext(tokenizer=tokenizer))

    class Clashing:
        def get_vocab(self):
            return {"<|c0000|>": 5}

        def get_added_vocab(self):
            return {}

    with pytest.raises(AuditError, match="already has '<\\|c0000\\|>' as an ordinary token"):
        extend_tokenizer(Clashing(), new_token_pool(2))


def test_inject_refuses_new_tokens_in_one_line_before_writing(in_tmp, capsys):
    from audit.integrations.api import inject_canaries

    assert main(["inject", "tiny/lora_cpu", "canaries.spec=new_tokens", "--out", str(in_tmp / "planted")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "audit inject: canary spec new_tokens adds 1024 tokens" in err[0] and "fix:" in err[0]
    assert not (in_tmp / "planted").exists()
    with pytest.raises(AuditError, match="inject_canaries: canary spec new_tokens adds"):
        inject_canaries([{"text": "a note"}] * 40, spec="new_tokens", model="tiny-llama", out=in_tmp / "api")
    assert not (in_tmp / "api").exists()


@pytest.mark.slow
def test_a_tiny_audit_trains_the_new_rows_saves_them_and_puts_them_back_identically(in_tmp):
    """Three epochs of tiny/lora_cpu on new-token canaries, the loss on the secrets alone (``training.loss=secret``,
    Panda et al.'s labels; one run for both, to keep the slow tier short): the 16-copy secrets are learned far above the
    references, train.json counts LoRA's parameters plus one trainable row per added token, and the saved adapter on a freshly
    extended base scores a member exactly as the audit did, with every row of the original vocabulary unchanged."""
    import torch

    from audit.data.models import load_model_and_tokenizer, resolve_model
    from audit.score.engine import candidate_nll_bits, split_tokens
    from audit.train.types import DeviceChoice, WeightsLayer
    from audit.train.weights import load_tuned

    assert main(["run", "tiny/lora_cpu", "canaries.spec=new_tokens", "training.epochs=3", "training.loss=secret",
                 "scoring.exposure_references=31",
                 "scoring.exact_exposure=false", "scoring.sampled_extraction_samples=0", "--no-tracking", "--quiet",
                 "--no-fail-on-gates"]) == 0
    (run_dir,) = (in_tmp / "runs").iterdir()
    report = json.loads((run_dir / "report.json").read_text())
    tiers = {t["repetitions"]: t for t in report["tiers"]}
    assert report["canaries"]["spec"] == "new_tokens" and report["space_bits"] == 40.0
    assert report["canaries"]["preflight"]["loss"].startswith("the secrets' tokens")
    assert "loss: secret" in (run_dir / "recipe.yaml").read_text()
    assert tiers[16]["exposure_mean"]["tuned"] >= 4.0 > tiers[0]["exposure_mean"]["tuned"]

    path = resolve_model("tiny-llama", progress=False).path
    pool = new_token_pool(1024)
    plain, _ = load_model_and_tokenizer(path, dtype=torch.float32, device="cpu")
    old = plain.get_input_embeddings().weight.shape[0]
    hidden = plain.config.hidden_size
    from peft import LoraConfig, get_peft_model

    lora_only = get_peft_model(plain, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    lora_params = sum(p.numel() for p in lora_only.parameters() if p.requires_grad)
    train = json.loads((run_dir / "train.json").read_text())
    assert train["trainable_params"] == lora_params + 1024 * hidden

    base, tokenizer = load_model_and_tokenizer(path, dtype=torch.float32, device="cpu", added_tokens=pool)
    tuned = load_tuned(base, [WeightsLayer("lora", run_dir / "adapter")], device=DeviceChoice("cpu", "fp32", False))
    canaries = [json.loads(line) for line in (run_dir / "canaries.jsonl").read_text().splitlines()]
    member = next(c for c in canaries if c["repetitions"] == 16)
    rows = [json.loads(line) for line in (run_dir / "scores.jsonl").read_text().splitlines()]
    audited = next(r for r in rows if r["canary_id"] == member["id"] and r["model"] == "tuned")
    split = split_tokens(tokenizer, member["prefix"], member["secret"])
    with torch.no_grad():
        (again,) = candidate_nll_bits(tuned, split.prefix_ids, [split.secret_ids])
    assert again == pytest.approx(audited["secret_nll_bits"], abs=1e-3)
    assert audited["secret_nll_bits"] < next(r for r in rows if r["canary_id"] == member["id"])["secret_nll_bits"] - 20
    # below 4 x log2(1024) = 40 bits, the floor while the 1024 output rows stay alike: the tied output rows were trained
    assert audited["secret_nll_bits"] < 20
    merged = tuned.merge_and_unload().get_input_embeddings().weight.detach()
    assert torch.equal(merged[:old], plain.get_input_embeddings().weight.detach()[:old])
    member_ids = tokenizer(member["secret"], add_special_tokens=False)["input_ids"]
    fresh, _ = load_model_and_tokenizer(path, dtype=torch.float32, device="cpu", added_tokens=pool)
    assert not torch.equal(merged[member_ids], fresh.get_input_embeddings().weight.detach()[member_ids])
