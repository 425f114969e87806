"""The scoring engine: token log-probabilities, full-vocabulary statistics and continuations, batched.

The audit reaches it through the scoring protocol (:mod:`audit.score.backend`), as :class:`audit.score.hf_backend.HFBackend`.

Entry points, each serving many metrics from one pass:

* :func:`score_token_sequences` runs one teacher-forced pass per sequence (sorted by length, padded per batch, batch
  size set by a token budget) and returns, per scored token, ``ln p(x_t | x_<t)`` and the mean and variance of
  ``ln p`` over the whole vocabulary (Min-K%++). The vocabulary is reduced on the device in row chunks: full logits
  never leave it. Every attack, the information view and (n, p) extraction reuse these numbers.
* :func:`candidate_nll_bits` scores many candidate secrets after one shared prefix; the prefix runs once and its
  key/value cache is reused, so a 6-digit secret after a 15-token prefix costs 5 positions instead of 21, and the
  candidates' first tokens run once per distinct value (~3.6 positions per candidate for 128 6-digit secrets).
* :func:`greedy_continuations` and :func:`sampled_continuations` decode a batch of prefixes (left-padded) for
  discoverable and sampled extraction.
* :func:`adapter_disabled` scores the base weights of a ``PeftModel`` on identical inputs.

Everything runs under ``torch.inference_mode`` in the model's own dtype, with the vocabulary reductions upcast to
fp32. The audit scores in fp32 on every device (``scoring.precision``, :func:`scoring_dtype`): in bf16 the logits are
rounded before any upcast (spacing 0.0625-0.125 nat at |logit| 8-32), which moved candidate bits by up to 0.46 bits
and 6 of 12 tiny-model ranks on CPU-bf16; :func:`in_scoring_precision` casts a model trained in another dtype.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from audit.score.backend import LN2, TokenScores  # noqa: F401  (they live with the protocol; imported from here too)

DEFAULT_CPU_TOKEN_BUDGET = 1024
"""Tokens per forward pass on CPU: past ~500 tokens the GEMMs are at full speed, and the logits stay < 0.5 GB."""
VOCAB_CHUNK_BYTES = 64 << 20
"""Working memory for one chunk of the full-vocabulary reductions (per temporary)."""


@dataclass(frozen=True)
class SplitTokens:
    """``prefix_ids + secret_ids`` is the tokenization of ``prefix + secret``."""

    prefix_ids: list[int]
    secret_ids: list[int]


def split_tokens_many(tokenizer, prefix: str, secrets: Sequence[str]) -> list[SplitTokens]:
    """:func:`split_tokens` for many secrets after one prefix, tokenized in one batched call."""
    if not secrets:
        return []
    head = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    out = []
    for full in tokenizer([prefix + s for s in secrets], add_special_tokens=False)["input_ids"]:
        b = 0
        while b < min(len(full), len(head)) and full[b] == head[b]:
            b += 1
        if b == 0:
            raise ValueError("the canary prefix must contain at least one token of its own")
        out.append(SplitTokens(prefix_ids=full[:b], secret_ids=full[b:]))
    return out


def split_tokens(tokenizer, prefix: str, secret: str) -> SplitTokens:
    """Tokenize ``prefix + secret`` and find where the secret's tokens begin.

    The boundary is the longest common token prefix of ``tok(prefix)`` and ``tok(prefix + secret)``: a BPE merge
    across the boundary (``"is"`` + ``" 4"``) moves the boundary left rather than scoring a token the model
    would never see.
    """
    full = tokenizer(prefix + secret, add_special_tokens=False)["input_ids"]
    head = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    b = 0
    while b < min(len(full), len(head)) and full[b] == head[b]:
        b += 1
    if b == 0:
        raise ValueError("the canary prefix must contain at least one token of its own")
    return SplitTokens(prefix_ids=full[:b], secret_ids=full[b:])


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id, else 0 (padded positions are masked anyway)."""
    if tokenizer is None:
        return 0
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


@contextlib.contextmanager
def adapter_disabled(model) -> Iterator[object]:
    """Yield the same module with its PEFT adapter switched off: base and tuned scored on identical inputs.

    A model without adapters (a full fine-tune has no base inside it) is refused: score its base separately.
    """
    if not hasattr(model, "disable_adapter"):
        raise TypeError("this model has no PEFT adapter to disable; load the base weights as a second model")
    with model.disable_adapter():
        yield model


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op CPU threads, then restore the previous count.

    Tiny models (tests) and CPUs shared with other jobs do better with 1 thread: each op lasts microseconds, and a
    second OpenMP thread mostly waits for a core (measured 60x slower on a loaded 2-core machine).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------- precision

SCORING_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def scoring_dtype(precision: str) -> torch.dtype:
    """``scoring.precision`` as a dtype: fp32 unless a recipe asks otherwise, on every device, whatever the training
    precision (a model trained in bf16 is scored with its bf16 weights upcast, exactly, to fp32)."""
    try:
        return SCORING_DTYPES[precision]
    except KeyError:
        raise ValueError(f"scoring precision {precision!r} is not one of {sorted(SCORING_DTYPES)}") from None


def _narrower(a: torch.dtype, b: torch.dtype) -> bool:
    """Casting ``a`` to ``b`` can round (fp32 -> bf16, bf16 <-> fp16)."""
    return a != b and torch.finfo(a).bits >= torch.finfo(b).bits


@contextlib.contextmanager
def without_autocast_forward(model) -> Iterator[None]:
    """Run the block with every forward that accelerate wrapped in autocast put back as it was; re-wrap on exit.

    With native AMP on (``training.precision`` bf16-mixed / fp16-mixed / bf16 / fp16; on CPU too for bf16)
    ``Accelerator.prepare_model``, which the Trainer calls, replaces ``model.forward`` with ``autocast(forward)`` and
    keeps the original as ``model._original_forward``: such a model computes in bf16 whatever its parameters' dtype.
    :func:`audit.train.sft.train_sft` drops the wrapper from the model it returns; a curve point scored during
    training (:mod:`audit.train.curve_points`) meets it, and the Trainer's next step needs it back.
    """
    wrapped = [(m, vars(m).pop("_original_forward"), vars(m)["forward"]) for m in model.modules()
               if "_original_forward" in vars(m) and "forward" in vars(m)]
    for m, original, _ in wrapped:
        vars(m)["forward"] = original  # what accelerate's unwrap_model(keep_fp32_wrapper=False) puts back
    try:
        yield
    finally:
        for m, original, wrapper in wrapped:
            vars(m)["forward"], vars(m)["_original_forward"] = wrapper, original


@contextlib.contextmanager
def in_scoring_precision(model, dtype: torch.dtype) -> Iterator[object]:
    """Yield ``model`` with every floating parameter in ``dtype`` and its arithmetic in ``dtype``; on exit each
    parameter is back in its own dtype.

    No autocast reaches the block: neither one it is called under nor accelerate's autocast wrapper of a model a
    Trainer prepared (:func:`without_autocast_forward`), which would compute fp32 weights in bf16 (on CPU
    ``bf16-mixed`` training moved tuned secret bits by up to 0.025 against the same weights reloaded).
    The cast is a no-op when the parameters are already in ``dtype`` (fp32 on CPU, and the mixed-precision CUDA
    default, which keeps fp32 weights). An upcast (bf16 weights, fp32 LoRA adapter -> fp32) is exact, so it is done in
    place and undone bit for bit: training afterwards starts from the same weights. A cast that could round works on
    a copy and leaves ``model`` untouched. Buffers (rotary frequencies, kept in fp32 by transformers) are left as they are.
    """
    with without_autocast_forward(model), torch.autocast(device_of(model).type, enabled=False):
        with _cast_parameters(model, dtype) as cast:
            yield cast


def own_forward_copy(model):
    """``copy.deepcopy(model)`` computing with its own weights: without the instance ``forward`` that wraps a module's
    class forward around a bound method of the *original* module, which a deep copy keeps pointing there.

    TRL's SFTTrainer installs one (``trl.trainer.utils.add_fused_lm_head``: ``_fused_forward`` calls the
    ``original_forward`` it closed over, the model's bound forward when it is not asked for the fused head). Copied,
    it still calls the original: a bf16 copy of a model trained in this process scored the fp32 original (tuned
    ``scoring.precision=bf16`` scores were fp32 arithmetic, unlike a resume's reload). Without the fused head the
    wrapper is the class forward, so dropping it changes nothing else. Accelerate's device hooks (a ``partial``
    wrapping a bound method, not the class forward) are kept.
    """
    target = copy.deepcopy(model)
    for module in target.modules():
        forward = vars(module).get("forward")
        if forward is not None and getattr(forward, "__wrapped__", None) is type(module).forward:
            del vars(module)["forward"]
    return target


@contextlib.contextmanager
def _cast_parameters(model, dtype: torch.dtype) -> Iterator[object]:
    params = [p for p in model.parameters() if p.is_floating_point()]
    if all(p.dtype == dtype for p in params):
        yield model
        return
    rounding = any(_narrower(p.dtype, dtype) for p in params)
    target = own_forward_copy(model) if rounding else model
    before = [(p, p.dtype) for p in target.parameters() if p.is_floating_point()]
    for p, _ in before:
        p.data = p.data.to(dtype)
    try:
        yield target
    finally:
        if rounding:
            del target
        else:
            for p, original in before:
                p.data = p.data.to(original)


# --------------------------------------------------------------------------------------------- batching


def default_token_budget(model) -> int:
    """Tokens per forward pass: fixed on CPU; on CUDA sized from the device's *total* memory (an eighth of it for the
    fp32 logits and two reduction temporaries), never from free memory.

    Free memory changes between calls (after training, on a GPU shared with other jobs, in a resumed run), and with
    it the batch plan, and in reduced precision the numbers: base and tuned, or a run and its resumption, would be
    scored under different batchings. Total memory is a property of the device, so the plan is too.
    """
    device = device_of(model)
    if device.type != "cuda":
        return DEFAULT_CPU_TOKEN_BUDGET
    total = torch.cuda.get_device_properties(device).total_memory
    vocab = int(model.get_output_embeddings().weight.shape[0])
    return int(max(256, min(65536, total // 8 // (vocab * 4 * 3))))


def plan_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices grouped into batches, longest first, each with ``rows * longest <= token_budget`` (at least 1 row).

    Longest-first puts the largest batch first, so an out-of-memory error shows at once, and sorting keeps padding
    small (lm-evaluation-harness does the same).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        w = max(width, lengths[i], 1)
        if current and (len(current) + 1) * w > token_budget:
            batches.append(current)
            current, w = [], max(lengths[i], 1)
        current.append(i)
        width = w
    if current:
        batches.append(current)
    return batches


def _right_padded(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[k, : len(r)] = 1
    return ids.to(device), mask.to(device)


# --------------------------------------------------------------------------------------------- reductions


class Reductions(NamedTuple):
    """What :func:`vocab_reductions` returns per row: all on the device, one entry per row of the logits."""

    logprobs: torch.Tensor
    """``ln p(target)``, fp32."""
    top1: torch.Tensor | None
    """``argmax(x) == target`` (bool): the target is the model's most likely token (EZ-MIA's error signal)."""
    mean: torch.Tensor | None
    """Mean of ``ln p`` over the vocabulary (fp64; None without ``with_stats``)."""
    var: torch.Tensor | None
    """Variance of ``ln p`` over the vocabulary (fp64; None without ``with_stats``)."""


def vocab_reductions(logits: torch.Tensor, targets: torch.Tensor, *, with_stats: bool, with_top1: bool = False) -> Reductions:
    """Per row of ``logits`` (N, V): ``ln p(target)``; with ``with_top1`` whether the target is the argmax; with
    ``with_stats`` the mean and variance of ``ln p``.

    With x the logits, lse = logsumexp(x) and p = softmax(x): ``ln p(t) = x_t - lse`` (fp32); ``mu = sum_v p_v ln p_v``
    and ``var = sum_v p_v (ln p_v - mu)^2``, reduced over ``ln p_v = x_v - lse`` in fp64. On a peaked token mu is tiny
    (-1e-4 .. -1e-8) while |lse| is ~20: in fp32 both ``sum_v p_v x_v - lse`` (two numbers near 20) and ``x_v - lse``
    (lse rounded to ulp(20)/2 = 1e-6) carry an absolute error of ~1e-6, which was 0.3% of one SmolLM2 Min-K%++ score
    and all of mu on sharper tokens. In fp64 the same reductions are exact to ~1e-15. Processed in row chunks so that
    only two (chunk, V) temporaries of 64 MB exist at a time. ``top1`` compares ``argmax`` of the fp32 logits (the
    first maximum on a tie) with the target: one more pass over the chunk, no temporary.
    """
    n, vocab = logits.shape
    if n == 0:
        empty = logits.new_zeros(0, dtype=torch.float32)
        none = logits.new_zeros(0, dtype=torch.bool) if with_top1 else None
        stats = logits.new_zeros(0, dtype=torch.float64) if with_stats else None
        return Reductions(empty, none, stats, stats)
    chunk = max(1, VOCAB_CHUNK_BYTES // (vocab * (8 if with_stats else 4)))
    lp_out, top_out, mu_out, var_out = [], [], [], []
    for s in range(0, n, chunk):
        x = logits[s : s + chunk].float()
        t = targets[s : s + chunk]
        lse = torch.logsumexp(x, dim=-1)
        lp_out.append(x.gather(-1, t[:, None]).squeeze(-1) - lse)
        if with_top1:
            top_out.append(x.argmax(dim=-1) == t)
        if with_stats:
            x = x.double()
            x = x - torch.logsumexp(x, dim=-1, keepdim=True)  # ln p, in fp64
            p = torch.exp(x)
            mu = torch.linalg.vecdot(p, x)
            x = x - mu[:, None]
            var_out.append(torch.linalg.vecdot(p, x * x))
            mu_out.append(mu)
    return Reductions(torch.cat(lp_out), torch.cat(top_out) if with_top1 else None,
                      torch.cat(mu_out) if with_stats else None, torch.cat(var_out) if with_stats else None)


@torch.inference_mode()
def score_token_sequences(
    model,
    sequences: Sequence[Sequence[int]],
    *,
    vocab_stats: bool = True,
    token_budget: int | None = None,
    pad_token_id: int = 0,
) -> list[TokenScores]:
    """One teacher-forced pass per sequence, batched: log-probs and (optionally) full-vocabulary mean/variance.

    Sequences are sorted longest first and right-padded per batch (``rows * longest <= token_budget``); results come
    back in input order, in float64 on the host. Padding never changes a real token's score: attention is causal
    and padded positions come after every real one.
    """
    device = device_of(model)
    budget = token_budget or default_token_budget(model)
    seqs = [list(s) for s in sequences]
    results: list[TokenScores | None] = [None] * len(seqs)
    for idx in plan_batches([len(s) for s in seqs], budget):
        rows = [seqs[i] for i in idx]
        if max(len(r) for r in rows) < 2:
            for i in idx:
                empty = np.zeros(0)
                results[i] = TokenScores(seqs[i], empty, empty if vocab_stats else None, empty if vocab_stats else None,
                                         np.zeros(0, dtype=bool))
            continue
        ids, mask = _right_padded(rows, pad_token_id, device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        rows_n, width = ids.shape
        # all positions of the batch in one reduction over the flat (rows * width, V) view (no copy of the logits);
        # each row's last position predicts nothing and padded positions are dropped on the host
        targets = torch.cat([ids[:, 1:], ids[:, :1]], dim=1).reshape(-1)
        reduced = vocab_reductions(logits.reshape(rows_n * width, -1), targets, with_stats=vocab_stats, with_top1=True)
        host = {name: None if t is None else (t if name == "top1" else t.double()).cpu().numpy().reshape(rows_n, width)
                for name, t in reduced._asdict().items()}  # one device-to-host copy per reduction and batch
        for k, (i, r) in enumerate(zip(idx, rows, strict=True)):
            n = max(len(r) - 1, 0)
            part = {name: None if h is None else h[k, :n].copy() for name, h in host.items()}
            results[i] = TokenScores(seqs[i], part["logprobs"], part["mean"], part["var"], part["top1"])
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- shared-prefix scoring


def _base_class(model) -> type:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel passes kwargs through
    return type(inner)


@functools.cache
def _takes_cache(cls: type) -> bool:
    return "cache" in inspect.signature(cls.forward).parameters


def with_cache(model, cache) -> dict:
    """The keyword that hands ``cache`` to ``model``'s forward: ``cache=`` where the model's forward declares it
    (transformers 5.24 renamed ``past_key_values``, deprecated, removed in 5.40), else ``past_key_values=`` (older
    transformers, remote-code models). Either way the same cache object reaches the same attention code."""
    return {"cache": cache} if _takes_cache(_base_class(model)) else {"past_key_values": cache}


def output_cache(out):
    """The key/value cache a forward pass returned (``out.cache``; ``out.past_key_values`` before the rename)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def expand_cache(cache, rows: int):
    """A copy of a one-row cache repeated for ``rows`` rows (the forward pass appends to it)."""
    c = copy.deepcopy(cache)
    c.batch_repeat_interleave(rows)
    return c


@torch.inference_mode()
def continuation_logprobs(model, cache, prefix_len: int, rows: list[list[int]]) -> torch.Tensor:
    """``ln p`` of every token of each row after the cached prefix, except each row's first token.

    Returns a (len(rows), width - 1) tensor, zero where a row is shorter. The caller supplies the first token's
    log-probability from the prefix's own next-token distribution. ``cache=None`` means no prefix.
    """
    device = device_of(model)
    ids, mask = _right_padded(rows, 0, device)
    width = ids.shape[1]
    if width < 2:
        return torch.zeros((len(rows), 0), device=device, dtype=torch.float64)
    if cache is None:  # no prefix: the rows stand alone
        logits = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=False).logits
    else:
        attention = torch.cat([torch.ones((len(rows), prefix_len), dtype=torch.long, device=device), mask], dim=1)
        logits = model(input_ids=ids[:, :-1], attention_mask=attention[:, :-1], use_cache=True,
                       **with_cache(model, expand_cache(cache, len(rows)))).logits
    flat = logits.reshape(-1, logits.shape[-1])
    lp = vocab_reductions(flat, ids[:, 1:].reshape(-1), with_stats=False).logprobs
    return lp.view(len(rows), width - 1).double() * mask[:, 1:]


def rows_cache(prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]], suffix, parents: Sequence[int], device):
    """A cache of ``len(parents)`` rows: the shared one-row prefix keys/values, then for row j the suffix keys/values
    of node ``parents[j]`` (``suffix``: per layer a (nodes, heads, tokens, dim) pair; None: the prefix alone)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    b = len(parents)
    sel = torch.as_tensor(list(parents), dtype=torch.long, device=device)
    for layer, (pk, pv) in enumerate(prefix_kv):
        k, v = pk.expand(b, -1, -1, -1), pv.expand(b, -1, -1, -1)
        if suffix is not None:
            sk, sv = suffix[layer]
            k, v = torch.cat([k, sk.index_select(0, sel)], dim=2), torch.cat([v, sv.index_select(0, sel)], dim=2)
        cache.update(k.contiguous(), v.contiguous(), layer)
    return cache


SHARED_LEVELS = 2
"""Trie levels of the candidates that :func:`candidate_nll_bits` runs once per distinct node: 6-digit candidates share
their first digit 10 ways and their first two ~100 ways, so 128 candidates cost 10 + ~72 + 3 x 128 = ~466 positions
instead of 5 x 128 = 640; deeper levels are nearly all distinct and run in one multi-token pass per candidate."""


@torch.inference_mode()
def candidate_nll_bits(model, prefix_ids: list[int], candidates: list[list[int]], *, batch_size: int = 64,
                       shared_levels: int = SHARED_LEVELS) -> list[float]:
    """-log2 p(candidate | prefix) for each candidate token list, sharing the prefix's KV cache and the candidates'
    common first tokens.

    The prefix runs once; its next-token distribution scores every candidate's first token. The candidates' first
    ``shared_levels`` tokens form a trie: each distinct node of it runs once, one new position on its parent's cached
    keys/values (as :mod:`audit.score.exposure_search` walks the whole space), and scores the next token of every
    candidate below it. Each candidate's remaining tokens then run in one pass on its node's cache, right-padded per
    batch of ``batch_size`` rows or more (up to the token budget; padded positions are ignored). Candidates may differ
    in length and repeat.
    """
    device = device_of(model)
    out = model(input_ids=torch.tensor([list(prefix_ids)], device=device), use_cache=True)
    prefix_kv = [(layer.keys, layer.values) for layer in output_cache(out).layers]
    prefix_len = len(prefix_ids)
    first_logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1).double().cpu().numpy()
    cands = [list(c) for c in candidates]
    nll = np.array([-first_logp[c[0]] for c in cands], dtype=np.float64)
    node_of = np.zeros(len(cands), dtype=np.int64)  # each candidate's node at the current level (0: the prefix itself)
    suffix = None  # per layer, the keys/values after the prefix of every node of the current level
    depth = 0
    for level in range(1, shared_levels + 1):
        active = [i for i, c in enumerate(cands) if len(c) > level]  # those with a token left to score at this level
        if not active:
            break
        nodes: dict[tuple[int, int], int] = {}
        child = np.array([nodes.setdefault((int(node_of[i]), cands[i][level - 1]), len(nodes)) for i in active])
        parents, tokens = zip(*nodes, strict=True)
        lp_rows, parts = [], []
        for start in range(0, len(nodes), max(batch_size, 1)):
            stop = min(len(nodes), start + max(batch_size, 1))
            cache = rows_cache(prefix_kv, suffix, parents[start:stop], device)
            past = cache.get_seq_length()
            ids = torch.tensor(tokens[start:stop], dtype=torch.long, device=device).view(-1, 1)
            step = model(input_ids=ids, use_cache=True, logits_to_keep=1, **with_cache(model, cache),
                         attention_mask=torch.ones((stop - start, past + 1), dtype=torch.long, device=device))
            lp_rows.append(torch.log_softmax(step.logits[:, -1].float(), dim=-1))
            parts.append([(layer.keys[:, :, prefix_len:], layer.values[:, :, prefix_len:])
                          for layer in output_cache(step).layers])
        lp = torch.cat(lp_rows)
        targets = torch.tensor([cands[i][level] for i in active], dtype=torch.long, device=device)
        nll[active] -= lp[torch.as_tensor(child, device=device), targets].double().cpu().numpy()
        node_of[active] = child
        suffix = [(torch.cat([p[layer][0] for p in parts]), torch.cat([p[layer][1] for p in parts]))
                  for layer in range(len(parts[0]))]
        depth = level
    rest = [i for i, c in enumerate(cands) if len(c) > depth + 1]
    rest.sort(key=lambda i: -len(cands[i]))  # longest first: an out-of-memory error shows early
    # rows per pass: at least batch_size, more while rows x tokens stays within the token budget (128 candidates with
    # 3 tokens left run as one pass of 384 positions: the GEMMs of 64-row passes ran ~15% slower on 2 CPU cores)
    width = max((len(cands[i]) - depth - 1 for i in rest), default=1)
    rows_per_pass = max(batch_size, 1, default_token_budget(model) // max(width, 1))
    for start in range(0, len(rest), rows_per_pass):
        idx = rest[start : start + rows_per_pass]
        cache = rows_cache(prefix_kv, suffix, [int(node_of[i]) for i in idx], device)
        past = cache.get_seq_length()
        ids, mask = _right_padded([cands[i][depth:] for i in idx], 0, device)
        attention = torch.cat([torch.ones((len(idx), past), dtype=torch.long, device=device), mask], dim=1)
        logits = model(input_ids=ids[:, :-1], attention_mask=attention[:, :-1], use_cache=True,
                       **with_cache(model, cache)).logits
        lp = vocab_reductions(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), with_stats=False).logprobs
        lp = (lp.view(len(idx), -1).double() * mask[:, 1:]).sum(dim=1)
        nll[idx] -= lp.cpu().numpy()
    return (nll / LN2).tolist()


# --------------------------------------------------------------------------------------------- decoding


def _left_padded(prefixes: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prefixes)
    ids = torch.full((len(prefixes), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prefixes), width), dtype=torch.long)
    for row, p in enumerate(prefixes):  # left padding keeps every prefix's last token in the last column
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def greedy_continuations(model, tokenizer, prefixes: list[list[int]], *, max_new_tokens: int,
                         batch_size: int = 32) -> list[list[int]]:
    """Greedy-decode ``max_new_tokens`` after each prefix (token ids); returns the new token ids per prefix."""
    device = device_of(model)
    pad = pad_id_of(tokenizer)
    results: list[list[int]] = [[] for _ in prefixes]
    order = sorted(range(len(prefixes)), key=lambda i: -len(prefixes[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = _left_padded([prefixes[i] for i in idx], pad, device)
        generated = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad, eos_token_id=None, num_beams=1,
        )
        for row, i in enumerate(idx):
            results[i] = generated[row, ids.shape[1] :].tolist()
    return results


def _prefill(model, ids: torch.Tensor, mask: torch.Tensor):
    """The key/value cache of left-padded ``ids`` (positions counted from each row's first real token, as
    ``generate`` counts them), for ``generate`` to continue from."""
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return output_cache(model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1))


@torch.inference_mode()
def sampled_continuations(
    model,
    tokenizer,
    prefixes: list[list[int]],
    *,
    num_samples: int,
    max_new_tokens: int,
    seed: int,
    temperature: float = 1.0,
    batch_size: int = 64,
) -> list[list[list[int]]]:
    """``num_samples`` sampled continuations (pure ancestral sampling at ``temperature``, no top-k) per prefix.

    Each prefix runs once: its keys/values (all but its last token) are computed for ``batch_size // num_samples``
    prefixes at a time, repeated ``num_samples`` times, and ``generate`` samples every row from there (8 samples of
    a 20-token prefix cost 20 + 8 x 6 positions instead of 8 x 26). Sampling draws from a private RNG seeded with
    ``seed``, so the same call gives the same samples on the same device and batch plan.
    """
    if num_samples < 1:
        raise ValueError("num_samples must be >= 1")
    device = device_of(model)
    pad = pad_id_of(tokenizer)
    out: list[list[list[int]]] = [[[] for _ in range(num_samples)] for _ in prefixes]
    order = sorted(range(len(prefixes)), key=lambda i: (-len(prefixes[i]), i))
    per_batch = max(1, batch_size // num_samples)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(order), per_batch):
            idx = order[start : start + per_batch]
            ids, mask = _left_padded([prefixes[i] for i in idx], pad, device)
            cached = {}
            if ids.shape[1] > 1:
                cache = _prefill(model, ids[:, :-1], mask[:, :-1])
                cache.batch_repeat_interleave(num_samples)
                cached = with_cache(model, cache)
            rows_ids, rows_mask = ids.repeat_interleave(num_samples, dim=0), mask.repeat_interleave(num_samples, dim=0)
            generated = model.generate(
                input_ids=rows_ids, attention_mask=rows_mask, max_new_tokens=max_new_tokens, do_sample=True,
                temperature=temperature, top_k=0, top_p=1.0, pad_token_id=pad, eos_token_id=None, num_beams=1, **cached,
            )
            for row, (i, k) in enumerate((i, k) for i in idx for k in range(num_samples)):
                out[i][k] = generated[row, ids.shape[1] :].tolist()
    return out


@torch.inference_mode()
def free_samples(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_k: int,
                 top_p: float, seed: int, batch_size: int,
                 on_progress: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """One sampled text per prompt (repeat a prompt for more), ``batch_size`` prompts per ``generate`` call
    (left-padded), each stopped at and cut before the tokenizer's end-of-text, from a private RNG seeded with
    ``seed``. ``on_progress(tokens, texts)``: told at every decoding step (tokens counted as if no text ended early)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    device = device_of(model)
    pad = pad_id_of(tokenizer)
    eos = tokenizer.eos_token_id
    out: list[list[int]] = []
    tokens = 0

    class _CountTokens(StoppingCriteria):  # progress only: it never stops anything
        def __call__(self, input_ids, scores, **kwargs):
            nonlocal tokens
            tokens += int(input_ids.shape[0])
            if on_progress is not None:
                on_progress(tokens, len(out))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    ticks = StoppingCriteriaList([_CountTokens()])
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            ids, mask = _left_padded(chunk, pad, device)
            generated = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k,
                max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos, num_beams=1, stopping_criteria=ticks,
            )
            for row in range(len(chunk)):
                new = generated[row, ids.shape[1] :].tolist()
                out.append(new[: new.index(eos)] if eos is not None and eos in new else new)
            tokens = (start + len(chunk)) * max_new_tokens  # a batch that ended early at end-of-text
            if on_progress is not None:
                on_progress(tokens, len(out))
    return out
