"""Storage rules for runs that span nodes: every path a stage writes or reads must be the same on every node.

Rank 0 writes the artifact and Ray Train writes checkpoints on whichever node they run on, and the next
stage (and the driver) read them back from theirs. A local path is then one node's private disk: the run
trains, then fails to find its own results. Such paths are refused before the stage starts, naming the
field; ``s3://`` (any fsspec URI) and network filesystems mounted on every node (NFS, EFS, Lustre, FUSE
object-store mounts) are accepted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from ..core.errors import ConfigError
from ..util import is_remote

__all__ = ["cluster_spread_reason", "fs_type", "require_shared_storage", "spread_reason"]

# Filesystem types (as /proc/mounts names them) that show one tree to every node that mounts them.
SHARED_FS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "lustre",
        "glusterfs",
        "ceph",
        "gpfs",
        "beegfs",
        "fuse.s3fs",
        "fuse.mountpoint-s3",
        "fuse.gcsfuse",
        "fuse.juicefs",
        "fuse.rclone",
        "fuse.sshfs",
    }
)


def _mounts() -> list[tuple[str, str]]:
    """``(mount point, fs type)`` of this machine (empty off Linux: every path then counts as local)."""
    try:
        with open("/proc/self/mounts") as f:
            rows = [line.split() for line in f]
    except OSError:
        return []
    # /proc/mounts escapes blanks in mount points as octal (\040)
    return [(r[1].replace("\\040", " "), r[2]) for r in rows if len(r) >= 3]


def fs_type(path: str, mounts: Iterable[tuple[str, str]] | None = None) -> str:
    """Filesystem type of the mount that holds ``path`` (the longest mount point above it)."""
    real = os.path.realpath(path)  # the path may not exist yet; its parents decide
    best, kind = "", ""
    for point, fstype in _mounts() if mounts is None else mounts:
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind


def spread_reason(nodes: list[dict], driver_node: str, needs: Mapping[str, float]) -> str | None:
    """Why a stage's workers may run on another node than the driver's (``None``: they cannot).

    Nodes count by node id, not IP: two raylets on one host (``--net=host`` containers) share an IP but
    not a disk. A single node that lacks what one worker needs (a CPU-only head, GPU workers) means the
    workers run on nodes the autoscaler has not started yet.
    """
    alive = [n for n in nodes if n.get("Alive")]
    ids = {n["NodeID"] for n in alive}
    if len(ids) > 1:
        return f"the cluster has {len(ids)} nodes"
    have = next((n.get("Resources", {}) for n in alive if n["NodeID"] == driver_node), {})
    missing = sorted(k for k, v in needs.items() if v and have.get(k, 0) < v)
    if missing:
        return f"this node has no {missing[0]} for the workers, so they would run on other nodes"
    return None


def cluster_spread_reason(needs: Mapping[str, float]) -> str | None:
    """:func:`spread_reason` for the connected cluster and this (the driver's) node."""
    import ray

    return spread_reason(ray.nodes(), ray.get_runtime_context().get_node_id(), needs)


def _local_path(path: str) -> str | None:
    """The local filesystem path of ``path``, or None for a remote URI."""
    if path.startswith("file://"):
        return path[len("file://") :]
    return None if is_remote(path) else os.path.abspath(path)


def require_shared_storage(
    paths: Mapping[str, str | None], worker_resources: Mapping[str, float] | None = None
) -> None:
    """Raise :class:`ConfigError` naming the first of ``paths`` (field -> path) that only one node sees.

    A no-op on a single node that can host the workers (a laptop, one `ray start` head): a local path
    is then where everything runs. Call it after connecting to Ray, before the trainer starts.
    """
    reason = cluster_spread_reason(worker_resources or {})
    if reason is None:
        return
    for field, path in paths.items():
        local = _local_path(path) if path else None
        if local is None or fs_type(local) in SHARED_FS:
            continue
        raise ConfigError(
            field,
            f"{local} is on this node's local disk, but {reason}: the artifact and checkpoints would land "
            "on whichever node writes them. Use s3://bucket/prefix (or a network filesystem mounted at "
            "the same path on every node)",
        )
