"""DP-SGD on LoRA with Opacus (Abadi et al. 2016, "Deep learning with differential privacy"; Opacus 1.6): the
fine-tuning a one-run audit can be checked against, because its privacy is known.

    from audit.train.dp import DPSettings, train_dp_lora
    result = train_dp_lora(model, tokenizer, texts, settings=DPSettings(epsilon=4.0, delta=1e-5), lora=LoraSection(),
                           epochs=1, batch_size=8, learning_rate=1e-3, max_length=64, seed=0, weights_dir=run / "adapter")
    result.eps_accountant   # the accountant's eps at settings.delta, for the steps actually taken

Each step: every record joins the batch independently with probability q = 1 / ceil(n / batch_size) (Poisson
sampling, Opacus' ``DPDataLoader``, whose rate is one over the plain loader's length: batch_size / n when batch_size
divides n, a little less otherwise; the accountant's amplification-by-sampling assumes exactly this), each record's
gradient of its own mean token loss is clipped to ``max_grad_norm``, the clipped gradients are summed, Gaussian noise of
standard deviation ``noise_multiplier * max_grad_norm`` is added, and the noisy sum is divided by Opacus' "expected
batch size" ``floor(n * q)``. The PRV accountant (Gopi, Lee, Wutschitz 2021) turns (q, noise_multiplier, steps) into
eps at delta; with ``epsilon`` given, the noise multiplier is solved for the planned number of steps first.

**Noise normalization** (:data:`NOISE_NORMALIZATION`, recorded beside each measured bound): the divisor
``floor(n * q)`` is a function of the record count n, not a constant. The accountant analyses the plain subsampled
Gaussian sum; two neighbouring datasets whose divisors differ (n and n - 1 on either side of a multiple of
ceil(n / batch_size)) release differently scaled noise, which in high dimension can tell them apart almost surely
(Opacus issue #819, open, for v1.0.0-1.6.0; Wang et al. 2026, arXiv 2605.15648, report DP-SGD implementations that
normalize the noisy sum, Opacus 0.9.0-1.5.4 among them, leaking beyond their accountant). A one-run bound above the
accountant's eps on such a run can therefore be a finding about the trainer, not a bug in the audit. It reveals the
record count, not which records: the one-run game, whose coins decide each canary alone, gains at most the count of
members from it.

**New-token canaries and the secret-span loss** (Panda et al. 2025's strongest design) run under DP too: the rows
PEFT trains for added tokens get per-record gradients from :func:`token_rows_grad_sample` (registered with Opacus,
checked against per-record autograd in tests/test_train_dp.py), and ``training.loss=secret`` labels a canary record's
secret tokens alone (:func:`_encode`). Neither changes the mechanism the accountant is given: one clipped gradient per
record, the same q, noise and steps.

Pitfalls this module closes (each would make a DP run silently wrong):

* **Device placement before PEFT** (Opacus issue #820, root cause in PR #830): ``model.to(device)`` must come before
  ``get_peft_model``; the other order produced LoRA runs whose loss fell and whose eps was accounted while the saved
  weights were unusable. The base is moved first here, and after training the LoRA weights must have moved: a run
  whose ``lora_B`` matrices (initialised at zero) are still zero fails loudly (:class:`DPNoOpError`).
* **Per-record loss**: Hugging Face's causal-LM loss averages over every token of the batch, so one record's gradient
  would depend on the other records' lengths and adding a record would change everyone's clipped contribution. The
  loss here is each record's own mean token loss, averaged over the batch (Opacus ``loss_reduction="mean"``).
* **Empty Poisson batches** are stepped, not skipped: Opacus adds noise to a zero sum and the accountant counts the
  step. Skipping would report a smaller eps than the run spent.
* **Records, not canaries**: the guarantee is per training record. A canary inserted k times is k records, so its
  privacy is eps of a group of k (roughly k eps); an audit meant to check the accountant must use single-copy
  canaries (tier ``1``), or compare against the group eps.

Bad settings (eps <= 0, delta outside (0, 1/n), both or neither of epsilon and noise_multiplier, a model Opacus cannot
wrap) raise :class:`audit.core.errors.AuditError` before training starts. In an audit (``training.dp`` in the recipe,
:class:`audit.core.schema.DPSection`) the recipe checks the first ones when it is read,
:func:`audit.data.validate.check_dp_settings` the
delta against the injected record count before anything is written, and the wrap check runs before the first step.

**What the one-run bounds may assume of such a run** (:data:`SAMPLING_NOTE`, copied into every DP report): the
accountant's eps is for Poisson sampling of *records* (each record joins each step independently with probability q),
which this trainer does; Steinke et al.'s and Xiang et al.'s one-run bounds assume each *canary* was included by its
own independent fair coin, which holds when the recipe says ``canaries.inclusion: coin``
(:mod:`audit.data.canaries.generate`); the default fixed split (exactly members_per_tier per tier, a random permutation)
makes the bound indicative only.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from audit.core.errors import AuditError
from audit.core.schema import DPAccounting, DPSection, LoraSection, TrainSummary
from audit.data.validate import check_dp_settings

SAMPLING_NOTE = ("DP-SGD (Opacus) with Poisson sampling of training records at rate q (the accountant's assumption, "
                 "met by construction); a canary inserted k times is k records, so only single-copy canaries are "
                 "covered by eps_accountant (a k-copy canary by the group eps, roughly k eps)")


@dataclass(frozen=True)
class DPSettings:
    """``training.dp``: a target ``epsilon`` (the noise multiplier is solved for) or a fixed ``noise_multiplier``."""

    epsilon: float | None = None
    delta: float = 1e-5
    """Must be below 1 / (number of training records): a larger delta allows releasing one record outright."""
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    """Per-record gradient clipping norm C; the noise standard deviation is ``noise_multiplier * C``."""
    accountant: Literal["prv", "rdp"] = "prv"


NOISE_NORMALIZATION = ("Opacus divides the clipped, noised gradient sum by floor(n * q) with q = 1 / ceil(n / batch_size): "
                       "a divisor that depends on the record count n, where the accountant analyses the plain subsampled "
                       "Gaussian sum (Opacus issue #819: v1.0.0-1.6.0; Wang et al. 2026, arXiv 2605.15648: Opacus "
                       "0.9.0-1.5.4 normalize the noisy sum and can leak beyond the accountant). It reveals the record "
                       "count, not which canaries are members")

class DPNoOpError(AuditError):
    """A DP run that left the trainable weights where they started (Opacus issue #820's silent failure)."""


@dataclass
class DPTrainResult:
    model: Any
    """The trained ``PeftModel`` (unwrapped from Opacus' ``GradSampleModule``)."""
    summary: TrainSummary
    eps_accountant: float
    """The accountant's eps at ``delta`` for the steps actually taken."""
    delta: float
    noise_multiplier: float
    sample_rate: float
    """q = 1 / ceil(records / batch_size) (Opacus' rate; batch_size / records when it divides them): each record joins
    each step independently with this probability, and the accountant was given it."""
    steps: int
    max_grad_norm: float
    accountant: str
    lora_delta_max: float
    """Largest |change| of any LoRA weight over training (must be > 0, see :class:`DPNoOpError`)."""
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    records: int = 0
    target_epsilon: float | None = None

    def accounting(self) -> DPAccounting:
        """What ``train.json`` records of the run's privacy (``TrainSummary.dp``)."""
        return DPAccounting(eps_accountant=self.eps_accountant, delta=self.delta, target_epsilon=self.target_epsilon,
                            noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
                            sample_rate=self.sample_rate, steps=self.steps, records=self.records,
                            accountant=self.accountant, lora_delta_max=self.lora_delta_max)


def check_opacus_can_wrap(model: Any) -> None:
    """One-line :class:`AuditError` before training for trainable weights Opacus computes no per-record gradient for.

    Opacus' hooks fire when a module is *called*; a trainable parameter held in a ``ParameterDict`` /
    ``ParameterList`` (PEFT's LoRA on an embedding keeps ``lora_embedding_A/B`` there) is used by its parent's
    forward without that container being called, so the first step fails with "Per sample gradient is not
    initialized" (Opacus issue #732), after the base was scored. Caught here instead, with the layer named. The one
    exception is a parameter its calling layer also owns directly, which is what :func:`_expose_token_rows` does for
    PEFT's trainable-token rows (their grad sampler is :func:`token_rows_grad_sample`).
    """
    import torch
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    containers = torch.nn.ParameterDict | torch.nn.ParameterList
    owned = {id(p) for m in model.modules() if not isinstance(m, containers) for p in m.parameters(recurse=False)}
    for name, module in model.named_modules():
        trainable = any(p.requires_grad for p in module.parameters(recurse=False))
        if isinstance(module, containers) and any(
                p.requires_grad and id(p) not in owned for p in module.parameters(recurse=False)):
            raise AuditError(f"Opacus cannot compute per-record gradients for the trainable weights in {name} (a parameter "
                             "container its layer uses without calling it, e.g. LoRA on an embedding)",
                             fix="put LoRA on linear layers only (training.lora.target_modules, e.g. [q_proj, v_proj])")
        # Opacus refuses trainable layers with buffers (BatchNorm's running statistics mix records); a trainable-token
        # layer's one buffer is a constant copy of its rows' starting values, read only to unmerge: no record reaches it
        if trainable and not isinstance(module, TrainableTokensLayer | containers) and any(True for _ in module.buffers()):
            raise AuditError(f"Opacus cannot compute per-record gradients for {name}: a trainable layer with buffers "
                             "(state shared across records, such as batch-norm statistics)",
                             fix="put LoRA on linear layers only (training.lora.target_modules, e.g. [q_proj, v_proj])")


def wrap_for_opacus(model: Any) -> Any:
    """Opacus' ``GradSampleModule`` around a model :func:`check_opacus_can_wrap` passed.

    Built here rather than inside ``make_private`` because Opacus' own strict check refuses every trainable layer
    with a buffer, including the trainable-token layer whose buffer no record touches; the check above keeps the
    refusal for every other such layer."""
    from opacus import GradSampleModule

    check_opacus_can_wrap(model)
    return GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)


TOKEN_ROWS = "dp_token_rows"
"""The name under which :func:`_expose_token_rows` registers a trainable-token layer's rows on the layer itself."""


def token_rows_grad_sample(layer: Any, activations: list[Any], backprops: Any) -> dict[Any, Any]:
    """Per-record gradient of the rows PEFT's ``TrainableTokensLayer`` trains (new-token canaries), for Opacus.

    The layer computes with ``W' = W.index_copy(0, idx, rows)``: an embedding lookup on the input side, ``x W'^T``
    when it wraps the tied output head. With ``g = dL_b/d(output)`` of record b (Opacus hands it over per record,
    already multiplied back from the batch mean), row k's gradient is

        embedding:  sum over positions t with x[b, t] = idx[k] of g[b, t, :]        (times the layer's embed scale)
        head:       sum over positions t of g[b, t, idx[k]] * x[b, t, :]

    Tied input and output rows are one parameter: Opacus adds the two layers' per-record gradients before clipping
    (its ``_forward_counter``), so a record's clipped norm covers both uses.
    """
    import torch

    x = activations[0]
    (adapter,) = layer.active_adapters
    rows = layer.trainable_tokens_delta[adapter]
    index = torch.as_tensor(layer.token_indices[adapter], device=x.device)
    batch = x.shape[0]
    if isinstance(layer.base_layer, torch.nn.Embedding):
        g = backprops.reshape(batch, -1, rows.shape[1])
        scale = layer._get_embed_scale()
        if scale is not None:
            g = g * scale.to(g.dtype)
        hit = (x.reshape(batch, -1, 1) == index).to(g.dtype)
        grad = torch.einsum("btk,btd->bkd", hit, g)
    else:
        h = x.reshape(batch, -1, x.shape[-1])
        g = backprops.reshape(batch, -1, backprops.shape[-1])[..., index]
        grad = torch.einsum("btk,btd->bkd", g, h)
    return {rows: grad.to(rows.dtype)}


def _register_token_rows_grad_sampler() -> None:
    from opacus.grad_sample import GradSampleModule, register_grad_sampler
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    if GradSampleModule.GRAD_SAMPLERS.get(TrainableTokensLayer) is not token_rows_grad_sample:
        register_grad_sampler(TrainableTokensLayer)(token_rows_grad_sample)


def _expose_token_rows(model: Any) -> list[Any]:
    """Register each trainable-token layer's rows as a direct parameter of that layer (:data:`TOKEN_ROWS`).

    Opacus hooks only modules that own a trainable parameter directly; PEFT keeps the rows in a ``ParameterDict``
    that the layer reads without calling it, so without this no hook would fire and the first step would fail. The
    layer wrapping a tied output head reads the same rows and gets the same parameter. Returns the layers changed
    (:func:`_hide_token_rows` undoes it before saving, so the adapter file is PEFT's own)."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    layers = []
    for module in model.modules():
        if isinstance(module, TrainableTokensLayer) and module.active_adapters:
            (adapter,) = module.active_adapters
            rows = module.trainable_tokens_delta[adapter]
            if rows.requires_grad:
                module.register_parameter(TOKEN_ROWS, rows)
                layers.append(module)
    if layers:
        _register_token_rows_grad_sampler()
    return layers


def _hide_token_rows(layers: list[Any]) -> None:
    for module in layers:
        del module._parameters[TOKEN_ROWS]


def _lora_snapshot(model: Any) -> dict[str, Any]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _encode(tokenizer: Any, texts: list[str], max_length: int, secret_spans: dict[int, list[tuple[int, int]]] | None = None):
    """Right-padded ids, attention masks and labels (-100 on padding), one row per record, cut after ``max_length``.

    ``secret_spans`` (``training.loss=secret``): a record with spans keeps labels only on the tokens that overlap
    them (:func:`audit.data.preflight.labels_on_spans`, the rule TRL training uses), so its loss, and the gradient that is
    clipped, is the mean over its secrets' tokens alone; every other record keeps all of its tokens."""
    import torch

    from audit.data.preflight import labels_on_spans

    rows, row_labels = [], []
    for i, text in enumerate(texts):
        spans = (secret_spans or {}).get(i)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=bool(spans))
        ids = enc["input_ids"]
        labels = labels_on_spans(ids, [tuple(o) for o in enc["offset_mapping"]], spans) if spans else list(ids)
        rows.append(ids[:max_length])
        row_labels.append(labels[:max_length])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, row_labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, : len(lab)] = torch.tensor(lab)
    return ids, mask, labels


def per_record_mean_loss(logits: Any, labels: Any) -> Any:
    """Each record's mean next-token cross-entropy over its own labelled tokens (shape: batch)."""
    import torch.nn.functional as F

    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    token_loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]).float(), shift_labels.reshape(-1),
                                 ignore_index=-100, reduction="none").view(shift_labels.shape)
    counts = (shift_labels != -100).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts


def dp_lora_model(model: Any, lora: LoraSection, *, trainable_token_ids: list[int] | None = None,
                  device: str = "cpu") -> tuple[Any, list[Any]]:
    """``model`` with a fresh LoRA adapter (and trainable rows for ``trainable_token_ids``), in train mode, checked to
    be a model Opacus computes every per-record gradient of. Returns the ``PeftModel`` and the token layers whose rows
    :func:`_expose_token_rows` registered (to undo before saving)."""
    from opacus.validators import ModuleValidator
    from peft import LoraConfig, get_peft_model

    model.to(device)  # before get_peft_model: Opacus #820 / PR #830
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=list(lora.target_modules), task_type="CAUSAL_LM",
                                             trainable_token_indices=list(trainable_token_ids) if trainable_token_ids else None))
    model.train()
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise AuditError(f"Opacus cannot compute per-record gradients for this model: {errors[0]}",
                         fix="train only modules Opacus supports (LoRA on linear layers) or use training.method=lora")
    token_layers = _expose_token_rows(model)
    check_opacus_can_wrap(model)  # before the base is trained: a refused layer is named before any step
    return model, token_layers


def _sample_rate(engine: Any) -> float:
    """The q Opacus sampled with and accounted for: ``1 / len(data_loader)`` = 1 / ceil(n / batch_size), which is at
    most batch_size / n (equal when batch_size divides n)."""
    rates = {rate for _, rate, _ in engine.accountant.history}
    if len(rates) != 1:
        raise AuditError(f"the DP accountant saw {len(rates)} sample rates in one run", fix="report this as a bug")
    return float(rates.pop())


def train_dp_lora(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    *,
    settings: DPSettings | DPSection,
    lora: LoraSection,
    epochs: float = 1.0,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    max_length: int = 64,
    seed: int = 0,
    weights_dir: Path,
    device: str = "cpu",
    progress: bool = True,
    on_loss: Callable[[int, float], None] | None = None,
    trainable_token_ids: list[int] | None = None,
    secret_spans: dict[int, list[tuple[int, int]]] | None = None,
) -> DPTrainResult:
    """DP-SGD fine-tuning of a LoRA adapter on ``texts``; the adapter is saved as safetensors in ``weights_dir``.

    ``batch_size`` is the *expected* batch (Poisson sampling at q = batch_size / n); ``epochs`` sets the number of
    steps, ``round(epochs * n / batch_size)``. Adam on the noisy gradient, as Opacus' examples and Panda et al.
    (2025) use it for LLM fine-tuning. ``on_loss(step, loss)`` gets each step's batch loss (tracking).
    ``trainable_token_ids``: embedding rows trained beside LoRA (new-token canaries, :func:`dp_lora_model`);
    ``secret_spans``: ``training.loss=secret`` (:func:`_encode`). Neither changes what the accountant is given
    (q, noise multiplier, steps): each record is still one clipped gradient.
    """
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    n = len(texts)
    check_dp_settings(settings, n)
    if not 1 <= batch_size <= n:
        raise AuditError(f"the expected DP batch ({batch_size}) must lie in [1, {n}] records",
                         fix=f"set training.batch_size to at most {n}")
    torch.manual_seed(seed)
    model, token_layers = dp_lora_model(model, lora, trainable_token_ids=trainable_token_ids, device=device)
    before = _lora_snapshot(model)
    ids, mask, labels = _encode(tokenizer, texts, max_length, secret_spans)
    loader = DataLoader(TensorDataset(ids, mask, labels), batch_size=batch_size,
                        generator=torch.Generator().manual_seed(seed))
    steps_per_epoch = len(loader)
    planned_epochs = max(1, round(epochs * n / batch_size)) / steps_per_epoch
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    engine = PrivacyEngine(accountant=settings.accountant)
    try:
        common = dict(module=wrap_for_opacus(model), optimizer=optimizer, data_loader=loader,
                      max_grad_norm=settings.max_grad_norm, poisson_sampling=True, loss_reduction="mean",
                      grad_sample_mode="hooks")
        if settings.epsilon is not None:
            dp_model, dp_optimizer, dp_loader = engine.make_private_with_epsilon(
                **common, target_epsilon=settings.epsilon, target_delta=settings.delta, epochs=math.ceil(planned_epochs))
        else:
            dp_model, dp_optimizer, dp_loader = engine.make_private(**common, noise_multiplier=settings.noise_multiplier)
    except NotImplementedError as exc:  # GradSampleModule: a trainable layer without a per-sample gradient
        first = " ".join(str(exc).split())[:200]
        raise AuditError(f"Opacus cannot compute per-record gradients for this model's trainable layers: {first}",
                         fix="put LoRA on linear layers only (training.lora.target_modules, e.g. [q_proj, v_proj])") from None
    total_steps = max(1, round(epochs * n / batch_size))
    history: list[tuple[int, float]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc="train (DP)", unit="step", leave=False)
    step = 0
    start = time.perf_counter()
    while step < total_steps:
        for b_ids, b_mask, b_labels in dp_loader:
            if step >= total_steps:
                break
            dp_optimizer.zero_grad(set_to_none=True)
            if b_ids.shape[0] > 0:  # an empty Poisson batch still steps: noise on a zero sum, counted by the accountant
                out = dp_model(input_ids=b_ids.to(device), attention_mask=b_mask.to(device), use_cache=False)
                loss = per_record_mean_loss(out.logits, b_labels.to(device)).mean()
                with warnings.catch_warnings():  # an embedding layer's hook sees no input gradient (ids): expected
                    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
                    loss.backward()
                history.append((step + 1, float(loss.detach())))
                if on_loss is not None:
                    on_loss(step + 1, history[-1][1])
            else:
                for p in dp_model.parameters():
                    if p.requires_grad:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            dp_optimizer.step()
            step += 1
            if bar is not None:
                bar.update(1)
                if history:
                    bar.set_postfix(loss=f"{history[-1][1]:.3f}")
    wall = time.perf_counter() - start
    if bar is not None:
        bar.close()
    trained = dp_model._module if hasattr(dp_model, "_module") else dp_model
    if hasattr(dp_model, "_close"):  # Opacus' hooks and grad_sample buffers off the model the audit goes on to score
        dp_model._close()
    _hide_token_rows(token_layers)
    trained.eval()
    moved = max(float((p.detach() - before[name]).abs().max()) for name, p in trained.named_parameters() if name in before)
    b_moved = [float(p.detach().abs().max()) for name, p in trained.named_parameters() if "lora_B" in name]
    if moved == 0.0 or (b_moved and max(b_moved) == 0.0):
        raise DPNoOpError(f"DP training ran {step} steps but left the LoRA weights unchanged (max |change| {moved:g})",
                          fix="check that the base was moved to its device before get_peft_model (Opacus #820) and "
                              "that the learning rate and steps are not zero")
    eps = float(engine.get_epsilon(settings.delta))
    weights_dir.mkdir(parents=True, exist_ok=True)
    trained.save_pretrained(str(weights_dir), safe_serialization=True)
    from audit.data.models import fingerprint_safetensors_dir, weights_dtype

    summary = TrainSummary(
        method="lora", steps=step, final_loss=history[-1][1] if history else None, wall_s=round(wall, 3),
        trainable_params=sum(p.numel() for p in trained.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in trained.parameters()), device=device, precision="fp32",
        gradient_checkpointing=False, weights_path=str(weights_dir), weights_fingerprint=fingerprint_safetensors_dir(weights_dir),
        weights_dtype=weights_dtype(weights_dir),
    )
    result = DPTrainResult(model=trained, summary=summary, eps_accountant=eps, delta=settings.delta,
                         noise_multiplier=float(dp_optimizer.noise_multiplier), sample_rate=_sample_rate(engine), steps=step,
                         max_grad_norm=settings.max_grad_norm, accountant=settings.accountant, lora_delta_max=moved,
                         loss_history=history, records=n, target_epsilon=settings.epsilon)
    result.summary = summary.model_copy(update={"dp": result.accounting()})
    return result
