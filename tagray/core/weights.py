"""Frozen weights as plain numpy arrays, and a model rebuilt around them without copying.

Used to share one base model between processes through an object store (Ray's plasma): the owner
exports each unique tensor once (tied weights stay tied; non-persistent buffers such as rotary
``inv_freq`` travel too), consumers rebuild the module skeleton on the ``meta`` device and assign
``torch.from_numpy`` views of the shared arrays. numpy has no bfloat16, so bf16 tensors travel as an
int16 view and are viewed back (still zero-copy). Pure torch + transformers; no Ray here.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn


def export_state(model: nn.Module) -> dict:
    """``{"config": dict, "arrays": {key: ndarray}, "names": {key: [names]}, "dtypes": {key: str}, "kinds": ...}``."""
    arrays, names, dtypes, kinds = {}, {}, {}, {}
    by_ptr: dict[tuple, str] = {}
    items = [(n, t, "param") for n, t in model.named_parameters(remove_duplicate=False)]
    items += [(n, t, "buffer") for n, t in model.named_buffers(remove_duplicate=False)]
    for name, t, kind in items:
        if t is None:
            continue
        key_ptr = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key_ptr in by_ptr:
            names[by_ptr[key_ptr]].append(name)
            continue
        key = f"t{len(arrays)}"
        by_ptr[key_ptr] = key
        cpu = t.detach().to("cpu").contiguous()
        dtypes[key] = str(cpu.dtype).replace("torch.", "")
        arrays[key] = (cpu.view(torch.int16) if cpu.dtype == torch.bfloat16 else cpu).numpy()
        names[key] = [name]
        kinds[key] = kind
    return {
        "config": model.config.to_dict(),
        "arrays": arrays,
        "names": names,
        "dtypes": dtypes,
        "kinds": kinds,
    }


def _tensor(arr: np.ndarray, dtype: str) -> torch.Tensor:
    with warnings.catch_warnings():
        # arrays from the object store are read-only; the base is frozen and never written to
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def import_state(state: dict, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild a frozen ``AutoModelForCausalLM`` around the exported arrays (zero-copy on CPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = dict(state["config"])
    config = AutoConfig.for_model(**cfg_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for key, arr in state["arrays"].items():
        t = _tensor(arr, state["dtypes"][key])
        if device is not None and torch.device(device).type != "cpu":
            t = t.to(device)  # one host-to-device copy per GPU replica
        shared = nn.Parameter(t, requires_grad=False) if state["kinds"][key] == "param" else t
        for name in state["names"][key]:
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            if state["kinds"][key] == "param":
                mod._parameters[attr] = shared
            else:
                mod._buffers[attr] = shared
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise RuntimeError(f"tensors not restored from the shared state: {leftovers[:5]}")
    return model.eval()


def shared_bytes(model: nn.Module) -> int:
    """Bytes of unique parameter and buffer storage (what one full copy of the base costs)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        p = t.untyped_storage().data_ptr()
        if p not in seen:
            seen.add(p)
            total += t.untyped_storage().nbytes()
    return total
