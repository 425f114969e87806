"""DP-SGD on LoRA with Opacus (Abadi et al. 2016, "Deep learning with differential privacy"; Opacus 1.6): the
fine-tuning a one-run audit can be checked against, because its privacy is known.

    from audit.train.dp import DPSettings, train_dp_lora
    result = train_dp_lora(model, tokenizer, texts, settings=DPSettings(epsilon=4.0, delta=1e-5), lora=LoraSection(),
                           epochs=1, batch_size=8, learning_rate=1e-3, max_length=64, seed=0, weights_dir=run / "adapter")
    result.eps_accountant   # the accountant's eps at settings.delta, for the steps actually taken

Each step: every record joins the batch independently with probability q = batch_size / n (Poisson sampling, Opacus'
``DPDataLoader``; the accountant's amplification-by-sampling assumes exactly this), each record's gradient of its own
mean token loss is clipped to ``max_grad_norm``, the clipped gradients are summed, Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` is added, and the sum is divided by the expected batch size. The PRV accountant
(Gopi, Lee, Wutschitz 2021) turns (q, noise_multiplier, steps) into eps at delta; with ``epsilon`` given, the noise
multiplier is solved for the planned number of steps first.

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
wrap) raise :class:`audit.errors.AuditError` before training starts. In an audit (``training.dp`` in the recipe,
:class:`audit.schema.DPSection`) the recipe checks the first ones when it is read, :func:`check_dp_settings` the
delta against the injected record count before anything is written, and the wrap check runs before the first step.

**What the one-run bounds may assume of such a run** (:data:`SAMPLING_NOTE`, copied into every DP report): the
accountant's eps is for Poisson sampling of *records* (each record joins each step independently with probability q),
which this trainer does; Steinke et al.'s and Xiang et al.'s one-run bounds assume each *canary* was included by its
own independent fair coin, which holds when the recipe says ``canaries.inclusion: coin``
(:mod:`audit.canaries.generate`); the default fixed split (exactly members_per_tier per tier, a random permutation)
makes the bound indicative only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from audit.errors import AuditError
from audit.schema import DPAccounting, DPSection, LoraSection, TrainSummary

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


MAX_TARGET_EPSILON = 64.0
"""Targets above this are refused: Opacus' noise search for eps = 1000 ran over 20 minutes and 4.9 GB (measured)."""


class DPNoOpError(AuditError):
    """A DP run that left the trainable weights where they started (Opacus issue #820's silent failure)."""


def check_dp_settings(settings: DPSettings | DPSection, n_records: int) -> None:
    """One-line :class:`AuditError` for every setting that would make the guarantee wrong or meaningless."""
    if (settings.epsilon is None) == (settings.noise_multiplier is None):
        raise AuditError("training.dp needs exactly one of epsilon and noise_multiplier",
                         fix="set training.dp.epsilon=4 (noise solved for it) or training.dp.noise_multiplier=1.0")
    if settings.epsilon is not None and not (settings.epsilon > 0 and math.isfinite(settings.epsilon)):
        raise AuditError(f"training.dp.epsilon must be a positive number, got {settings.epsilon}",
                         fix="choose a target such as training.dp.epsilon=4")
    if settings.epsilon is not None and settings.epsilon > MAX_TARGET_EPSILON:
        raise AuditError(f"training.dp.epsilon={settings.epsilon:g} is beyond {MAX_TARGET_EPSILON:g}: no meaningful "
                         "guarantee, and solving the noise for it did not finish in 20 minutes (eps = 1000, PRV)",
                         fix="set training.dp.noise_multiplier directly (e.g. 0.3) for a weakly private run")
    if settings.noise_multiplier is not None and not settings.noise_multiplier > 0:
        raise AuditError(f"training.dp.noise_multiplier must be > 0, got {settings.noise_multiplier}",
                         fix="use a noise multiplier such as 1.0 (larger is more private)")
    if n_records < 1:
        raise AuditError("DP training needs at least one training record", fix="check the corpus section")
    if not 0 < settings.delta < 1 / n_records:
        raise AuditError(f"training.dp.delta={settings.delta:g} must lie in (0, 1/n) = (0, {1 / n_records:.3g}) for "
                         f"{n_records} training records: a delta of 1/n allows releasing one record outright",
                         fix=f"set training.dp.delta={10 ** math.floor(math.log10(0.1 / n_records)):g} or smaller")
    if not settings.max_grad_norm > 0:
        raise AuditError(f"training.dp.max_grad_norm must be > 0, got {settings.max_grad_norm}",
                         fix="use a clipping norm such as 1.0")
    if settings.accountant not in ("prv", "rdp"):
        raise AuditError(f"unknown accountant {settings.accountant!r}", fix="use training.dp.accountant=prv or rdp")


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
    """q = expected batch size / records: each record joins each step independently with this probability."""
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
    initialized" (Opacus issue #732), after the base was scored. Caught here instead, with the layer named.
    """
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ParameterDict | torch.nn.ParameterList) and any(
                p.requires_grad for p in module.parameters(recurse=False)):
            raise AuditError(f"Opacus cannot compute per-record gradients for the trainable weights in {name} (a parameter "
                             "container its layer uses without calling it, e.g. LoRA on an embedding)",
                             fix="put LoRA on linear layers only (training.lora.target_modules, e.g. [q_proj, v_proj])")


def _lora_snapshot(model: Any) -> dict[str, Any]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _encode(tokenizer: Any, texts: list[str], max_length: int):
    """Right-padded ids, attention masks and labels (-100 on padding), one row per record, cut after ``max_length``."""
    import torch

    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def per_record_mean_loss(logits: Any, labels: Any) -> Any:
    """Each record's mean next-token cross-entropy over its own labelled tokens (shape: batch)."""
    import torch.nn.functional as F

    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    token_loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]).float(), shift_labels.reshape(-1),
                                 ignore_index=-100, reduction="none").view(shift_labels.shape)
    counts = (shift_labels != -100).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts


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
) -> DPTrainResult:
    """DP-SGD fine-tuning of a LoRA adapter on ``texts``; the adapter is saved as safetensors in ``weights_dir``.

    ``batch_size`` is the *expected* batch (Poisson sampling at q = batch_size / n); ``epochs`` sets the number of
    steps, ``round(epochs * n / batch_size)``. Adam on the noisy gradient, as Opacus' examples and Panda et al.
    (2025) use it for LLM fine-tuning. ``on_loss(step, loss)`` gets each step's batch loss (tracking).
    """
    import torch
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader, TensorDataset

    n = len(texts)
    check_dp_settings(settings, n)
    if not 1 <= batch_size <= n:
        raise AuditError(f"the expected DP batch ({batch_size}) must lie in [1, {n}] records",
                         fix=f"set training.batch_size to at most {n}")
    torch.manual_seed(seed)
    model.to(device)  # before get_peft_model: Opacus #820 / PR #830
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    model.train()
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise AuditError(f"Opacus cannot compute per-record gradients for this model: {errors[0]}",
                         fix="train only modules Opacus supports (LoRA on linear layers) or use training.method=lora")
    check_opacus_can_wrap(model)
    before = _lora_snapshot(model)
    ids, mask, labels = _encode(tokenizer, texts, max_length)
    loader = DataLoader(TensorDataset(ids, mask, labels), batch_size=batch_size,
                        generator=torch.Generator().manual_seed(seed))
    steps_per_epoch = len(loader)
    planned_epochs = max(1, round(epochs * n / batch_size)) / steps_per_epoch
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    engine = PrivacyEngine(accountant=settings.accountant)
    common = dict(module=model, optimizer=optimizer, data_loader=loader, max_grad_norm=settings.max_grad_norm,
                  poisson_sampling=True, loss_reduction="mean", grad_sample_mode="hooks")
    try:
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
    from audit.models import fingerprint_safetensors_dir, weights_dtype

    summary = TrainSummary(
        method="lora", steps=step, final_loss=history[-1][1] if history else None, wall_s=round(wall, 3),
        trainable_params=sum(p.numel() for p in trained.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in trained.parameters()), device=device, precision="fp32",
        gradient_checkpointing=False, weights_path=str(weights_dir), weights_fingerprint=fingerprint_safetensors_dir(weights_dir),
        weights_dtype=weights_dtype(weights_dir),
    )
    result = DPTrainResult(model=trained, summary=summary, eps_accountant=eps, delta=settings.delta,
                         noise_multiplier=float(dp_optimizer.noise_multiplier), sample_rate=batch_size / n, steps=step,
                         max_grad_norm=settings.max_grad_norm, accountant=settings.accountant, lora_delta_max=moved,
                         loss_history=history, records=n, target_epsilon=settings.epsilon)
    result.summary = summary.model_copy(update={"dp": result.accounting()})
    return result
