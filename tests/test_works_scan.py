"""The whole-work window scan (audit.score.works_scan): rows from a fake scorer by hand, and the tiny model's rows
recomputed independently with a plain transformers loop (one window at a time, no batching, no engine)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from audit.score.works_scan import ScanSettings, engine_scorer, scan_works


def fake_scorer(calls: list[int]):
    """ln p of token x is -x / 10 nats; the argmax flag is "x is even": numbers a reader can check by hand."""

    def score(seqs):
        calls.append(len(seqs))
        return [(-np.asarray(s[1:], dtype=float) / 10, np.asarray(s[1:]) % 2 == 0) for s in seqs]

    return score


def test_rows_follow_the_windows_of_each_work_by_hand():
    calls: list[int] = []
    works = [("a", [0, 1, 2, 4, 6, 8]), ("b", [3, 3, 2, 2])]
    rows = scan_works(works, score=fake_scorer(calls), model="m", settings=ScanSettings(prefix=2, suffix=2, stride=2),
                      windows_per_call=2)
    assert [(r.work_id, r.start) for r in rows] == [("a", 0), ("a", 2), ("b", 0)]
    assert calls == [2, 1]  # windows of both works pooled into calls of 2
    a0, a2, b0 = rows
    assert a0.logp_z == pytest.approx(-(2 + 4) / 10) and a0.greedy  # suffix tokens 2, 4
    assert a2.logp_z == pytest.approx(-(6 + 8) / 10) and a2.p_z == pytest.approx(math.exp(-1.4))
    assert b0.logp_z == pytest.approx(-0.4) and b0.greedy  # suffix 2, 2; the odd prefix tokens do not count
    assert not any(r.greedy for r in scan_works([("c", [2, 2, 3, 2])], score=fake_scorer([]), model="m",
                                                 settings=ScanSettings(prefix=2, suffix=2, stride=2)))


def test_greedy_reads_the_suffix_only_and_code_length_sums_over_the_work():
    calls: list[int] = []
    rows = scan_works([("b", [3, 3, 2, 2, 5])], score=fake_scorer(calls), model="m",
                      settings=ScanSettings(prefix=2, suffix=2, stride=1))
    assert [r.start for r in rows] == [0, 1]
    assert rows[0].greedy is True  # suffix 2, 2: prefix token 3 (odd) does not count
    assert rows[1].greedy is False  # suffix 2, 5
    assert sum(r.code_tokens for r in rows) == 4  # tokens 1..4
    assert sum(r.code_bits for r in rows) == pytest.approx((3 + 2 + 2 + 5) / 10 / math.log(2))


def test_a_work_shorter_than_one_window_is_refused():
    with pytest.raises(ValueError, match="shorter than one window"):
        scan_works([("short", [1, 2, 3])], score=fake_scorer([]), model="m", settings=ScanSettings(2, 2, 2))


def test_the_engine_scan_agrees_with_a_plain_transformers_loop(tiny_model):
    """p_z and the greedy flag of sampled windows, recomputed one window at a time from the raw logits (1e-4 in ln)."""
    import torch

    model, tokenizer = tiny_model
    rng = np.random.default_rng(0)
    ids = rng.integers(3, len(tokenizer), size=300).tolist()
    ids[100:140] = ids[0:40]  # a repeat, so the tiny model's argmax sometimes matches
    settings = ScanSettings(prefix=12, suffix=10, stride=7)
    rows = scan_works([("w", ids)], score=engine_scorer(model, pad_token_id=tokenizer.pad_token_id, token_budget=200),
                      model="base", settings=settings, windows_per_call=16)
    assert len(rows) == len(range(0, 300 - 22 + 1, 7)) + 1
    checked = 0
    for row in [rows[i] for i in sorted(rng.choice(len(rows), size=8, replace=False))]:
        window = torch.tensor([ids[row.start : row.start + settings.width]])
        with torch.no_grad():
            logits = model(input_ids=window).logits[0].double()
        lp = torch.log_softmax(logits, dim=-1)
        targets = window[0, settings.prefix :]
        steps = lp[settings.prefix - 1 : settings.width - 1]
        logp_z = float(steps.gather(1, targets[:, None]).sum())
        greedy = bool((steps.argmax(dim=-1) == targets).all())
        assert row.logp_z == pytest.approx(logp_z, abs=1e-4)
        assert row.greedy == greedy
        checked += 1
    assert checked == 8
    total = sum(r.code_tokens for r in rows)
    assert total == 299


def test_a_work_trained_twice_as_often_is_more_extractable(tiny_model_dir):
    """Carlini et al. 2023: extraction grows with repetitions. Three random works of 48 tokens, one in every batch
    twice, trained by a plain full fine-tune of tiny-llama; the scan must rank the doubled work first."""
    import torch

    from audit.data.models import load_model_and_tokenizer
    from audit.score.engine import torch_threads

    model, tokenizer = load_model_and_tokenizer(tiny_model_dir, dtype=torch.float32, device="cpu")
    rng = np.random.default_rng(7)
    works = {name: rng.integers(3, len(tokenizer), size=48).tolist() for name in ("twice", "once_a", "once_b")}
    batch = torch.tensor([works["twice"], works["twice"], works["once_a"], works["once_b"]])
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    with torch_threads(1):  # a tiny model on a shared CPU: one thread is fastest
        for _ in range(25):
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        rows = scan_works(list(works.items()), score=engine_scorer(model), model="tuned",
                          settings=ScanSettings(prefix=8, suffix=8, stride=4))

    def mean(name: str, field: str) -> float:
        return float(np.mean([getattr(r, field) for r in rows if r.work_id == name]))

    assert mean("twice", "logp_z") > max(mean("once_a", "logp_z"), mean("once_b", "logp_z")) + 1.0
    assert mean("twice", "code_bits") < min(mean("once_a", "code_bits"), mean("once_b", "code_bits"))
    assert mean("twice", "greedy") >= max(mean("once_a", "greedy"), mean("once_b", "greedy"))
