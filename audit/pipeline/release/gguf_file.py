"""GGUF files of a llama-architecture model: written as llama.cpp's ``convert_hf_to_gguf.py`` writes them, read back
into fp32 by the dequantization the format defines.

    from audit.pipeline.release.gguf_file import write_gguf, read_gguf
    info = write_gguf("runs/<run>/merged", tokenizer, "model.q4_0.gguf", "q4_0")
    back = read_gguf("model.q4_0.gguf")          # back.model: a plain fp32 LlamaForCausalLM, back.tokenizer

Writing mirrors llama.cpp for ``LlamaForCausalLM``: tensor names from ``gguf.TensorNameMap(MODEL_ARCH.LLAMA)``, the
query and key projections permuted into llama.cpp's rotary layout, hyperparameters under ``llama.*``, the tokenizer as
``tokenizer.ggml.model = gpt2`` (byte-level BPE) with tokens, token types, merges and the special ids, and no
``output.weight`` when the output layer is tied to the embeddings. 2-D weights take the requested type, 1-D tensors
(norms) stay F32 (llama.cpp's "mostly <type>, except 1d tensors"); a weight whose rows are not a whole number of
blocks stays F32 too. Only the types whose quantizer ``gguf.quants`` implements in numpy are written
(:data:`SUPPORTED_TYPES`, checked with gguf 0.19); K-quants and i-quants need llama.cpp's ``llama-quantize`` and are
refused in one line.

Reading uses ``gguf.GGUFReader`` and the reference numpy dequantizer ``gguf.quants.dequantize`` (the block formulas
of ggml, e.g. Q8_0: ``x = d * q`` with one fp16 scale per 32 weights), then undoes the permutation; nothing is
approximated beyond what the file stores, so an F32 file reads back bit for bit. The tokenizer is built from the
file's metadata by transformers' GGUF tokenizer converter (vocabulary, merges, control tokens), with the digit split
of llama.cpp's ``smollm`` pre-tokenizer restored when the file names it (transformers has no regex for that name).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audit.core.errors import AuditError
from audit.core.schema import GGUF_TYPES

SUPPORTED_TYPES = GGUF_TYPES
"""GGUF types written and read here: those ``gguf.quants`` quantizes in numpy (gguf 0.19), most precise first."""
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "bf16": 32}
"""``general.file_type`` (llama.cpp's ``LlamaFileType``) of a file whose 2-D weights are of each type."""
ARCHITECTURE = "llama"
PRE_TOKENIZERS = {("ByteLevel",): "gpt-2", ("Digits", "ByteLevel"): "smollm"}
"""The byte-level pre-tokenizers a GGUF can name, as llama.cpp defines them: GPT-2's regex alone (``gpt-2``), or each
digit split off first and then GPT-2's regex (``smollm``: SmolLM2's, and tiny-llama's, which copied it)."""
MAGIC = b"GGUF"


@dataclass(frozen=True)
class GgufInfo:
    """A GGUF file written: where, its type, its sha256 (the release's fingerprint) and size."""

    path: Path
    qtype: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class GgufModel:
    """A GGUF file read back: a plain fp32 ``LlamaForCausalLM``, the tokenizer of its metadata, and what it held."""

    model: Any
    tokenizer: Any
    qtype: str
    """The type of its 2-D weights (from ``general.file_type``, else the most common tensor type)."""
    tensor_types: dict[str, str]
    """Each GGUF tensor's type (``token_embd.weight``: ``Q8_0``, ...)."""
    pre: str | None


def check_qtype(qtype: str) -> str:
    """``qtype`` lower-cased if :data:`SUPPORTED_TYPES` has it, else one line naming the supported ones."""
    name = str(qtype).strip().lower()
    if name not in SUPPORTED_TYPES:
        raise AuditError(f"GGUF type '{qtype}' is not supported: gguf-py has no numpy quantizer for it",
                         fix=f"use one of {', '.join(SUPPORTED_TYPES)} (K-quants such as q4_k_m need llama.cpp's llama-quantize)")
    return name


def _ggml_type(qtype: str) -> Any:
    import gguf

    return gguf.GGMLQuantizationType[qtype.upper()]


def _permute(w: Any, n_head: int) -> Any:
    """llama.cpp's ``LlamaModel.permute``: each head's rotary halves interleaved (HF keeps them as two halves)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: Any, n_head: int) -> Any:
    """The inverse of :func:`_permute` (transformers' ``reverse_permute_weights``)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _name_map(n_blocks: int) -> Any:
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)


def _gguf_name(names: Any, key: str) -> str | None:
    return names.get_name(key, try_suffixes=(".weight", ".bias"))


def _load(model_or_dir: Any) -> Any:
    if isinstance(model_or_dir, (str, Path)):
        import torch

        from audit.data.models import load_causal_lm

        return load_causal_lm(Path(model_or_dir), dtype=torch.float32, device="cpu")
    return model_or_dir


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise AuditError("the tokenizer has no fast (tokenizers) backend, so its vocabulary and merges cannot be written",
                         fix="save the model with a fast byte-level BPE tokenizer (tokenizer.json)")
    return json.loads(backend.to_str())


def pre_tokenizer_name(tokenizer: Any) -> str:
    """The GGUF ``tokenizer.ggml.pre`` of a byte-level BPE tokenizer (:data:`PRE_TOKENIZERS`); another is one line."""
    data = _tokenizer_json(tokenizer)
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = tuple(s.get("type") for s in steps)
    ok = data.get("model", {}).get("type") == "BPE" and all(
        s.get("individual_digits", True) for s in steps if s.get("type") == "Digits")
    if not ok or kinds not in PRE_TOKENIZERS:
        raise AuditError(f"the tokenizer ({data.get('model', {}).get('type')}, pre-tokenizer {'+'.join(map(str, kinds))}) "
                         "is not a byte-level BPE a GGUF file can name",
                         fix="GGUF releases are written for byte-level BPE tokenizers (SmolLM2, tiny-llama)")
    return PRE_TOKENIZERS[kinds]


def _tokenizer_metadata(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """tokens, token types and merges as llama.cpp's ``get_vocab_base`` writes them: ids without a token padded as
    ``[PAD<i>]`` (UNUSED), added special tokens CONTROL, other added tokens USER_DEFINED."""
    from gguf import TokenType

    data = _tokenizer_json(tokenizer)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    if by_id and max(by_id) >= vocab_size:
        raise AuditError(f"the tokenizer has token id {max(by_id)}, beyond the model's vocabulary of {vocab_size}",
                         fix="resize the model's embeddings to the tokenizer")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL if i not in added else
                         TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data.get("model", {}).get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def write_gguf(model_or_dir: Any, tokenizer: Any, out_path: str | Path, qtype: str, *,
               name: str = "canary-audit release") -> GgufInfo:
    """Write ``model_or_dir`` (a ``LlamaForCausalLM`` or a safetensors directory) with ``tokenizer`` as a GGUF file of
    ``qtype`` (:data:`SUPPORTED_TYPES`) at ``out_path``; written beside it and renamed, so an error leaves no file."""
    import gguf
    import numpy as np
    import torch

    from audit.data.models import sha256_file

    qtype = check_qtype(qtype)
    model = _load(model_or_dir)
    cfg = model.config
    if getattr(cfg, "model_type", None) != ARCHITECTURE:
        raise AuditError(f"GGUF releases are written for llama models; this one is a {getattr(cfg, 'model_type', '?')} model",
                         fix="release a LlamaForCausalLM (SmolLM2, tiny-llama, TinyLlama)")
    pre = pre_tokenizer_name(tokenizer)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    names = _name_map(cfg.num_hidden_layers)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    writer = gguf.GGUFWriter(str(tmp), ARCHITECTURE)
    try:
        writer.add_name(name)
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_file_type(FILE_TYPES[qtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab = _tokenizer_metadata(tokenizer, cfg.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        writer.add_token_merges(vocab["merges"])
        for setter, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                                 (writer.add_eos_token_id, tokenizer.eos_token_id),
                                 (writer.add_pad_token_id, tokenizer.pad_token_id)):
            if token_id is not None:
                setter(int(token_id))
        writer.add_add_bos_token(False)  # the audit scores text as the tokenizer encodes it: no BOS (tiny, SmolLM2)
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        block = gguf.GGML_QUANT_SIZES[_ggml_type(qtype)][0]
        for key, tensor in model.state_dict().items():
            if tied and key == "lm_head.weight":
                continue  # llama.cpp reads the embeddings as the output layer when output.weight is absent
            gname = _gguf_name(names, key)
            if gname is None:
                raise AuditError(f"tensor {key} has no GGUF name in llama.cpp's llama architecture",
                                 fix="release a plain LlamaForCausalLM (no extra modules)")
            w = tensor.detach().to(torch.float32).cpu().numpy()
            if key.endswith("q_proj.weight"):
                w = _permute(w, n_head)
            elif key.endswith("k_proj.weight"):
                w = _permute(w, n_kv)
            w = np.ascontiguousarray(w)
            if w.ndim < 2 or qtype == "f32" or w.shape[-1] % block:
                writer.add_tensor(gname, w)
            else:
                data = gguf.quants.quantize(w, _ggml_type(qtype))
                writer.add_tensor(gname, data, raw_dtype=_ggml_type(qtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return GgufInfo(path=out, qtype=qtype, sha256=sha256_file(out), bytes=out.stat().st_size)


def open_gguf(path: str | Path) -> Any:
    """A ``gguf.GGUFReader`` of ``path``, checked: a GGUF file (magic), whole (every tensor's bytes inside the file), of
    the llama architecture, with tensor types :func:`read_gguf` can dequantize. Each failure is one line."""
    import gguf

    p = Path(path).expanduser()
    fix = "give a GGUF file as llama.cpp's convert_hf_to_gguf.py or a recipe's `release` section writes it"
    if not p.is_file():
        raise AuditError(f"GGUF file {path} does not exist", fix=fix)
    with p.open("rb") as f:
        magic = f.read(4)
    if magic != MAGIC:
        raise AuditError(f"{path} is not a GGUF file (it starts with {magic!r}, not {MAGIC!r})", fix=fix)
    size = p.stat().st_size
    try:
        reader = gguf.GGUFReader(str(p))
    except (ValueError, IndexError, KeyError, OSError, TypeError) as exc:
        raise AuditError(f"{path} is truncated or damaged: the GGUF header cannot be read ({str(exc).splitlines()[0][:80]})",
                         fix="copy the file again (compare its sha256 with the source's)") from None
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise AuditError(f"{path} is truncated: its tensors need {end} bytes, the file has {size}",
                         fix="copy the file again (compare its sha256 with the source's)")
    arch = _field(reader, "general.architecture")
    if arch != ARCHITECTURE:
        raise AuditError(f"{path} holds a {arch} model; only the llama architecture is read",
                         fix="measure a llama-architecture GGUF (SmolLM2, tiny-llama, TinyLlama)")
    bad = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type.name.lower() not in SUPPORTED_TYPES})
    if bad:
        raise AuditError(f"{path} holds tensors of type {', '.join(bad)}, which this reader does not dequantize",
                         fix=f"measure a file of {', '.join(SUPPORTED_TYPES)} "
                             "(a recipe's `release: {gguf: [...]}` section writes one)")
    return reader


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _config(reader: Any) -> Any:
    from transformers import LlamaConfig

    def need(key: str) -> Any:
        value = _field(reader, f"{ARCHITECTURE}.{key}")
        if value is None:
            raise AuditError(f"the GGUF metadata has no {ARCHITECTURE}.{key}", fix="give a file llama.cpp can load")
        return value

    n_head = int(need("attention.head_count"))
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    names = {t.name for t in reader.tensors}
    return LlamaConfig(
        vocab_size=int(_field(reader, f"{ARCHITECTURE}.vocab_size", len(tokens))), hidden_size=int(need("embedding_length")),
        intermediate_size=int(need("feed_forward_length")), num_hidden_layers=int(need("block_count")),
        num_attention_heads=n_head, num_key_value_heads=int(_field(reader, f"{ARCHITECTURE}.attention.head_count_kv", n_head)),
        max_position_embeddings=int(need("context_length")), rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, f"{ARCHITECTURE}.rope.freq_base", 10000.0)),
        head_dim=int(_field(reader, f"{ARCHITECTURE}.rope.dimension_count", int(need("embedding_length")) // n_head)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"), eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )


def dequantized_state_dict(reader: Any, config: Any) -> dict[str, Any]:
    """The HF state dict of ``config``'s ``LlamaForCausalLM`` from the file's tensors, each dequantized by
    ``gguf.quants.dequantize`` into fp32 and un-permuted. A tensor the model needs and the file lacks (or of another
    shape) is one line."""
    import numpy as np
    import torch
    from gguf import quants
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        expected = LlamaForCausalLM(config).state_dict()
    names = _name_map(config.num_hidden_layers)
    tensors = {t.name: t for t in reader.tensors}
    out: dict[str, Any] = {}
    for key, ref in expected.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        gname = _gguf_name(names, key)
        if gname not in tensors:
            raise AuditError(f"the GGUF file has no tensor {gname} (the model's {key})", fix="give a file llama.cpp can load")
        t = tensors[gname]
        w = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if tuple(w.shape) != tuple(ref.shape):
            raise AuditError(f"GGUF tensor {gname} is {list(w.shape)}, the model its metadata describes needs {list(ref.shape)}",
                             fix="give a file llama.cpp can load")
        if key.endswith("q_proj.weight"):
            w = _unpermute(w, config.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            w = _unpermute(w, config.num_key_value_heads)
        out[key] = torch.from_numpy(np.array(w, dtype=np.float32, copy=True))
    return out


def read_tokenizer(path: str | Path) -> Any:
    """The tokenizer a GGUF file's metadata describes (transformers' converter: vocabulary, merges, control tokens),
    with llama.cpp's ``smollm`` digit split restored when the file names that pre-tokenizer."""
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    try:
        architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(path))
        backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except (ValueError, KeyError) as exc:
        raise AuditError(f"{path} describes no tokenizer transformers can build ({str(exc).splitlines()[0][:80]})",
                         fix="give a GGUF file with a byte-level BPE tokenizer (tokenizer.ggml.model = gpt2)") from None
    if tokenizer_dict.get("pre_tokenizer_type") == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    special = {k: v for k, v in tokenizer_config.items() if k in ("bos_token", "eos_token", "pad_token", "unk_token") and v}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def read_gguf(path: str | Path) -> GgufModel:
    """``path`` read back as a plain fp32 ``LlamaForCausalLM`` (:func:`dequantized_state_dict`) with the tokenizer of
    its metadata (:func:`read_tokenizer`); not a GGUF file, truncated, or of a type not dequantized here: one line."""
    import torch
    from transformers import LlamaForCausalLM

    reader = open_gguf(path)
    config = _config(reader)
    state = dequantized_state_dict(reader, config)
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise AuditError(f"{path} does not fill the llama model it describes "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
                         fix="give a file llama.cpp can load")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    file_type = _field(reader, "general.file_type")
    qtype = next((k for k, v in FILE_TYPES.items() if v == file_type), None) or _most_common(
        [v for k, v in types.items() if not k.endswith("norm.weight")]).lower()
    return GgufModel(model=model, tokenizer=read_tokenizer(path), qtype=qtype, tensor_types=types,
                     pre=_field(reader, "tokenizer.ggml.pre"))


def _most_common(values: list[str]) -> str:
    from collections import Counter

    return Counter(values).most_common(1)[0][0] if values else "f32"


def is_gguf_path(path: str | Path) -> bool:
    """A file (not a model directory) named ``*.gguf`` or starting with the GGUF magic: what ``--model`` reads as GGUF."""
    p = Path(path).expanduser()
    if not p.is_file():
        return False
    if p.suffix.lower() == ".gguf":
        return True
    with p.open("rb") as f:
        return f.read(4) == MAGIC


def fp32_model_dir(path: str | Path, *, check: Any = None, progress: bool = False) -> Any:
    """A :class:`audit.data.models.ResolvedModel` of the GGUF file ``path`` read back (:func:`read_gguf`) and saved as a plain
    fp32 safetensors directory with its metadata's tokenizer, cached by the file's sha256, so ``audit measure`` checks
    and loads it like any fine-tune (and a resume finds it). ``check(dir)`` runs on the new directory before it enters
    the cache (the shape check against the base): a refused file leaves nothing there. Every refusal is one line."""
    import shutil
    import tempfile

    from audit.core.console import say
    from audit.data.models import ResolvedModel, cache_dir, fingerprint_safetensors_dir, sha256_file

    open_gguf(path)  # not GGUF, truncated, another architecture or type: refused before anything is read or written
    p = Path(path).expanduser().resolve()
    sha = sha256_file(p)
    final = cache_dir() / "models" / f"gguf-{sha[:16]}"
    if not (final / "provenance.json").is_file():
        say(progress, f"[model] reading {p.name}: dequantizing its tensors into fp32 (cached by sha256 {sha[:12]})")
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".gguf-", dir=final.parent))
        try:
            back = read_gguf(p)
            back.model.save_pretrained(staging, safe_serialization=True)
            back.tokenizer.save_pretrained(staging)
            if check is not None:
                check(staging)
            provenance = {"gguf_file": str(p), "gguf_sha256": sha, "gguf_type": back.qtype, "gguf_pre": back.pre,
                          "weights_fingerprint": fingerprint_safetensors_dir(staging)}
            (staging / "provenance.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
            try:
                staging.rename(final)
            except OSError:  # another process cached the same file first
                if not (final / "provenance.json").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    elif check is not None:
        check(final)
    provenance = json.loads((final / "provenance.json").read_text(encoding="utf-8"))
    return ResolvedModel(source=str(p), kind="local", path=final, provenance={**provenance, "gguf_file": str(p)})
