"""One frozen base per cluster in Ray's object store, owned by a detached actor.

The owner loads the base once (from disk, S3 or the packaged GGUF), exports every unique tensor as a
numpy array (:func:`tagray.core.weights.export_state`) and ``ray.put``s it. Train workers and Serve
replicas ``ray.get`` it: on CPU the arrays are views of the node's shared memory (no copy, no disk
read); on GPU each does one host-to-device copy. The owner is detached so that objects survive the
process that started it (a job driver or ``serve run``); when an owner dies its objects die with it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import ray

from ..core.base import Base, load_base, load_tokenizer
from ..core.weights import export_state, import_state

NAMESPACE = "tagray"


@ray.remote(num_cpus=0)
class BaseOwner:
    """Holds the object-store copy of one base model (name, dtype)."""

    def __init__(self, name: str, dtype: str):
        base = load_base(name, dtype=dtype)
        with tempfile.TemporaryDirectory() as d:
            base.tokenizer.save_pretrained(d)
            self.tokenizer_files = {f: open(os.path.join(d, f), "rb").read() for f in os.listdir(d)}
        self.fingerprint = base.fingerprint
        self.name = name
        self.ref = ray.put(export_state(base.model))  # this actor owns the object
        del base

    def info(self) -> dict:
        # the ref travels inside a list so Ray hands it over as a reference, not as resolved arrays
        return {
            "refs": [self.ref],
            "tokenizer_files": self.tokenizer_files,
            "fingerprint": self.fingerprint,
            "name": self.name,
        }

    def ready(self) -> bool:
        return True


def owner_name(name: str, dtype: str) -> str:
    """``tagray-base-<dtype>-<hash of name>``: one owner per (base, resolved dtype)."""
    if dtype == "auto":  # resolved by the caller from its workers' resources (tagray.train.resolve_dtype)
        raise ValueError("the shared base needs a resolved dtype (float32 / bfloat16), not 'auto'")
    return f"tagray-base-{dtype}-" + hashlib.blake2b(name.encode(), digest_size=6).hexdigest()


def get_base_owner(name: str, dtype: str = "float32"):
    """The cluster's owner of ``(name, dtype)``, created on first use (detached, shared by every job)."""
    actor = BaseOwner.options(
        name=owner_name(name, dtype), namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote(name, dtype)
    ray.get(actor.ready.remote())
    return actor


def base_info(name: str, dtype: str = "float32") -> dict:
    return ray.get(get_base_owner(name, dtype).info.remote())


def attach_base(info: dict, device=None) -> Base:
    """Build a frozen :class:`Base` over the shared arrays (zero-copy on CPU)."""
    state = ray.get(info["refs"][0])
    model = import_state(state, device)
    d = tempfile.mkdtemp(prefix="tagray-tok-")
    for f, data in info["tokenizer_files"].items():
        with open(os.path.join(d, f), "wb") as fh:
            fh.write(data)
    return Base(name=info["name"], model=model, tokenizer=load_tokenizer(d), fingerprint=info["fingerprint"])


def release_base(name: str, dtype: str = "float32") -> None:
    """Kill the owner (and so free the shared weights)."""
    try:
        ray.kill(ray.get_actor(owner_name(name, dtype), namespace=NAMESPACE))
    except ValueError:
        pass
