"""Stage setup: load the base and the previous tag set, build the tag and head banks, start the heads.

New tags start from the paper's mean-embedding init. Each new head reads its function tag's hidden state
standardised with statistics of the training rows and starts from a ridge fit on them (a linear probe);
that probe pass also fills the prefix store, so training reuses every row's frozen prefix from step 1.
Tasks whose trainable parameters are disjoint form independent *groups*: their losses depend on
different parameters, so each group keeps its own best validation step.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field

import torch

from ..config import TrainConfig
from ..core.artifacts import TagSet, load_tagset
from ..core.base import Base, load_base
from ..core.data import to_device
from ..core.errors import ConfigError
from ..core.heads import HeadBank, HeadSpec, feature_stats, head_init, ridge_fit
from ..core.model import TagLLM
from ..core.prefix import PrefixStore
from ..core.progress import progress
from ..core.tags import TagBank, mean_embedding_init
from ..tasks.dataset import TaskData, build_task_data, tag_kinds
from ..tasks.spec import TaskSpec, load_task
from .batches import Example, encode_rows, make_batch, sorted_batches
from .job import StageJob, resolve_dtype
from .memo import FeatureMemo

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Group:
    """Tasks that share trainable parameters, and those parameters."""

    tasks: list[int]  # indices into Setup.tasks
    tags: set[str]
    heads: set[str]
    name: str = ""


@dataclass
class Setup:
    model: TagLLM
    base: Base
    tasks: list[TaskData]
    eval_tasks: list[TaskData]
    prev: TagSet | None
    tag_info: dict[str, dict]
    train_tags: set[str]
    train_heads: set[str]
    task_specs: dict[str, dict] = field(default_factory=dict)
    cfg: TrainConfig = field(default_factory=TrainConfig)
    groups: list[Group] = field(default_factory=list)
    probe: dict[str, dict] = field(default_factory=dict)  # head -> {"rows", "lambda"}
    stage: str = ""  # the stage's name, for progress lines
    rank: int = 0  # of this worker: only rank 0 prints progress
    memo: FeatureMemo = field(default_factory=FeatureMemo, repr=False)  # head features per tag state
    _encoded: dict = field(default_factory=dict, repr=False)

    @property
    def pad_id(self) -> int:
        return self.base.tokenizer.pad_token_id

    @property
    def sharded(self) -> bool:
        """Each worker holds only its own training rows (Ray Data ingest), not every row."""
        return any(td.shard is not None for td in self.tasks)

    def head_names(self) -> list[str]:
        return self.model.heads.names if self.model.heads is not None else []

    def examples(self, td: TaskData, split: str, limit: int | None = None) -> list[Example]:
        """Encoded rows of one task's split (encoded once per setup)."""
        key = (td.spec.name, split, limit)
        if key not in self._encoded:
            self._encoded[key] = encode_rows([td], self.base.tokenizer, self.model.tags, split, limit)
        return self._encoded[key]


def target_spec(td: TaskData) -> HeadSpec:
    spec = td.spec
    if spec.target.kind == "classification":
        return HeadSpec("classification", len(spec.target.classes), classes=spec.target.classes)
    # a worker holding a shard got the whole split's statistics with it; otherwise every row is here
    st = td.shard["stats"] if td.shard is not None else _train_stats(td)
    return HeadSpec(
        "regression",
        len(st["mean"]),
        tuple(st["mean"]),
        tuple(max(v, 1e-6) for v in st["std"]),
        lo=tuple(st["min"]),
        hi=tuple(st["max"]),
        clip=spec.target.range,
        input_chars=tuple(st["chars"]) if st["chars"] else None,
    )


def _train_stats(td: TaskData) -> dict:
    """The training targets' mean, std (1 for a single row), min, max and input lengths (the shape of
    :func:`tagray.tasks.stream.combine_stats`)."""
    rows = td.splits["train"]
    y = torch.tensor([r["_target"] for r in rows], dtype=torch.float64)
    std = y.std(0) if len(y) > 1 else torch.ones(y.shape[1], dtype=torch.float64)
    chars = [td.spec.input_chars(r) for r in rows]
    return {
        "mean": y.mean(0).tolist(),
        "std": std.tolist(),
        "min": y.min(0).values.tolist(),
        "max": y.max(0).values.tolist(),
        "chars": [min(chars), max(chars)] if chars else None,
    }


def _select_tags(
    job: StageJob, tasks: list[TaskData], eval_tasks: list[TaskData], known: dict
) -> tuple[dict, set]:
    """Tags the tasks use (name -> kind) and the ones this stage trains; errors name the config key."""
    used: dict[str, str] = {}
    for td in tasks:
        for t, kind in tag_kinds(td.spec, td.tags()).items():
            used.setdefault(t, kind)
    untrained = set(job.stage.untrained_tags)
    if untrained - set(used):
        raise ConfigError("untrained_tags", f"{sorted(untrained - set(used))} are used by no task")
    if job.stage.train_tags is not None:
        train_tags = set(job.stage.train_tags)
        bad = train_tags - set(used) - set(known)
        if bad:
            raise ConfigError("train_tags", f"{sorted(bad)} are used by no task of stage {job.stage.name!r}")
    else:
        train_tags = {t for t in used if t not in known and t not in untrained}
    if train_tags & untrained:
        raise ConfigError("untrained_tags", f"{sorted(train_tags & untrained)} are also in train_tags")
    missing = [t for t in used if t not in known and t not in train_tags and t not in untrained]
    if missing:
        raise ConfigError("train_tags", f"{missing} are needed by the tasks but neither trained nor loaded")
    for td in eval_tasks:
        for t in td.tags():
            if t not in known and t not in used:
                raise ConfigError(
                    "eval_tasks", f"{td.spec.name} needs tag {t}, which no stage so far provides"
                )
    return used, train_tags


def _groups(tasks: list[TaskData], train_tags: set[str], train_heads: set[str]) -> list[Group]:
    """Connected components of tasks over shared trainable tags / heads."""
    owned = []
    for td in tasks:
        own = {("tag", t) for t in td.tags() if t in train_tags}
        if td.spec.head_tag in train_heads:
            own.add(("head", td.spec.head_tag))
        owned.append(own)
    groups: list[Group] = []
    for i, own in enumerate(owned):
        if not own:
            continue
        hit = [g for g in groups if any(own & owned[j] for j in g.tasks)]
        merged = Group([i], {n for k, n in own if k == "tag"}, {n for k, n in own if k == "head"})
        for g in hit:
            groups.remove(g)
            merged.tasks += g.tasks
            merged.tags |= g.tags
            merged.heads |= g.heads
        groups.append(merged)
    for g in groups:
        g.tasks.sort()
        g.name = "+".join(tasks[i].spec.name for i in g.tasks)
    return groups


def _store(cfg, device) -> PrefixStore | None:
    if cfg.prefix == "off":
        return None
    spill, shared = cfg.prefix_cache_spill, cfg.prefix_cache_shared
    shared = None if shared in ("search", "off") else shared  # search: the planner turns it to auto
    return PrefixStore(
        int(cfg.prefix_cache_gb * 2**30), DTYPES[cfg.prefix_cache_dtype], spill_dir=spill, shared_dir=shared
    )


def store_context(model: TagLLM, base: Base, dtype: torch.dtype) -> str:
    """What every cached prefix depends on besides its row: base weights, frozen tags, span rule, dtype."""
    h = hashlib.blake2b(digest_size=12)
    h.update(base.fingerprint["weights_hash"].encode())
    h.update(model.tags.frozen.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    h.update(f"{model.isolate_spans}|{dtype}".encode())
    return h.hexdigest()


def build_setup(
    job: StageJob,
    base: Base | None = None,
    device: torch.device | None = None,
    rt=None,
    task_data: list[TaskData] | None = None,
) -> Setup:
    """Load base, previous tags and task data; create the banks and start the heads. Pure torch.

    ``task_data``: the stage's tasks as the executor ingested them (e.g. this worker's shard of the
    training rows); default: every row, read here. ``rt``: the runtime (its rank prints progress; it
    gathers the probe's features over the ranks when each holds a shard)."""
    cfg = job.stage.train
    device = device or torch.device("cpu")
    rank = rt.rank if rt is not None else 0
    # data and tag-set errors first: a typo must not wait for the base to load
    every = cfg.progress_s if rank == 0 else None
    tasks = task_data or [
        build_task_data(load_task(t) if not isinstance(t, TaskSpec) else t, every) for t in job.stage.tasks
    ]
    eval_tasks = [build_task_data(load_task(t), every) for t in job.stage.eval_tasks]
    prev = load_tagset(job.init_from) if job.init_from else None
    base = base or load_base(job.base, dtype=resolve_dtype(job.dtype, device.type == "cuda"))
    if prev is not None:
        prev.check_base(base.fingerprint, where=str(job.init_from))
    known = dict(prev.tag_info) if prev else {}
    used, train_tags = _select_tags(job, tasks, eval_tasks, known)

    emb = base.model.get_input_embeddings().weight
    gen = torch.Generator().manual_seed(cfg.seed)
    entries, info = {}, {}
    for name in list(known) + [t for t in used if t not in known]:
        if name in known and prev is not None:
            entries[name], info[name] = prev.tags[name], dict(known[name])
        else:
            entries[name] = mean_embedding_init(emb, cfg.tag_length, cfg.init_noise, gen)
            info[name] = {"kind": used[name], "length": cfg.tag_length, "stage": job.stage.name}
        if name in train_tags:
            info[name]["stage"] = job.stage.name
    bank = TagBank(entries, trainable=train_tags)

    head_entries = dict(prev.heads) if prev else {}
    head_specs = dict(prev.head_specs) if prev else {}
    train_heads: set[str] = set()
    for td in tasks:
        h = td.spec.head_tag
        if h is None or (h in head_entries and h not in train_tags):
            continue  # no head, or a function tag from an earlier stage, frozen with its head
        spec = target_spec(td)
        if h in train_heads and head_specs[h] != spec:
            raise ConfigError("tasks", f"two tasks train head {h} with different targets")
        head_specs[h], head_entries[h] = spec, head_init(emb, spec.out_dim, gen)
        train_heads.add(h)
    stats = dict(prev.head_stats) if prev else {}
    heads = (
        HeadBank(head_entries, head_specs, emb.shape[1], trainable=train_heads, stats=stats)
        if head_entries
        else None
    )
    model = TagLLM(
        base.model,
        bank,
        heads,
        isolate_spans=cfg.isolate_spans,
        track_momentum=cfg.track_feature_mean if cfg.head_mode == "track" else 0.0,
        center_heads=cfg.head_mode == "batch",
        prefix=cfg.prefix,
        prefix_store=_store(cfg, device),
    ).to(device)
    if model.prefix_store is not None:
        model.prefix_store.ensure_context(store_context(model, base, emb.dtype))
    task_specs = dict(prev.tasks) if prev else {}
    task_specs.update({td.spec.name: td.spec.to_json() for td in tasks + eval_tasks})
    setup = Setup(model, base, tasks, eval_tasks, prev, info, train_tags, train_heads, task_specs, cfg)
    setup.groups = _groups(tasks, train_tags, train_heads)
    setup.stage, setup.rank = job.stage.name, rank
    with model.prefix_store.fill_lock() if model.prefix_store is not None else contextlib.nullcontext():
        init_heads(setup, device, rt)  # the probe pass fills the store: with a shared one, once per node
    return setup


def _features(setup: Setup, chunk: list[Example], device) -> torch.Tensor:
    """What the heads read for ``chunk`` at the current tags ``(len(chunk), d)``, float32 on the CPU."""
    b = to_device(make_batch(chunk, setup.head_names(), setup.pad_id), device)
    return setup.model.head_features(b).float().cpu()


@torch.no_grad()
def head_features(
    setup: Setup, td: TaskData, rows: int | None, device, batch_size: int = 16, rank=0, world=1
):
    """Features a new head reads ``(n, d)`` and the rows' targets ``(n, k)``, on training rows.

    Runs through the model's prefix store, so these rows' frozen prefixes are cached for training.
    """
    model = setup.model
    was = model.training
    model.eval()
    exs = setup.examples(td, "train", rows or None)
    feats, ys = [], []
    what = f"stage {setup.stage}: {td.spec.name} head features ({len(exs)} training rows)"
    batches = sorted_batches(exs, batch_size, rank, world)
    for idx in progress(batches, what, setup.cfg.progress_s, enabled=setup.rank == 0):
        chunk = [exs[i] for i in idx]
        feats.append(setup.memo.read(model, chunk, lambda c=chunk: _features(setup, c, device)))
        ys += [e.target for e in chunk]
    model.train(was)
    if not feats:
        return torch.zeros(0, model.heads.width - 1), torch.zeros(0, 1)
    return torch.cat(feats), torch.tensor(ys, dtype=torch.float32)


def train_features(setup: Setup, td: TaskData, rows: int | None, device, rt=None, batch_size: int = 16):
    """:func:`head_features` of ``rows`` training rows, over every rank: each computes a share and all get
    the gathered whole. A rank holding a shard reads ``rows / world`` of its own rows; otherwise every
    rank holds every row and reads every ``world``-th batch of the first ``rows``."""
    if rt is None or rt.world_size == 1:
        return head_features(setup, td, rows, device, batch_size)
    if setup.sharded:
        feats, y = head_features(setup, td, -(-rows // rt.world_size) if rows else None, device, batch_size)
    else:
        feats, y = head_features(setup, td, rows, device, batch_size, rank=rt.rank, world=rt.world_size)
    parts = rt.all_gather((feats, y))
    return torch.cat([f for f, _ in parts]), torch.cat([t for _, t in parts])


def init_heads(setup: Setup, device, rt=None) -> None:
    """Feature statistics and (``head_init: ridge``) a ridge-probe start for every new head."""
    cfg, heads = setup.cfg, setup.model.heads
    for td in setup.tasks:
        h = td.spec.head_tag
        if h not in setup.train_heads or h in setup.probe:
            continue
        # with every row on every rank, each computes the same probe alone (no collective before DDP)
        # the probe pass runs every row's full prompt once (it fills the prefix store): batches of 64 rows
        # keep the CPU's matrix products ~25% busier than 16 (the suffix passes later stay at 16)
        feats, y = train_features(setup, td, cfg.probe_rows, device, rt if setup.sharded else None, 64)
        mu, sd = feature_stats(feats)
        heads.set_stats(h, mu, sd)
        setup.probe[h] = {"rows": len(feats)}
        if cfg.head_init == "ridge" and len(feats) >= 8:
            w, lam = ridge_fit((feats - mu) / sd, y, heads.specs[h], seed=cfg.seed)
            with torch.no_grad():
                heads.get(h).copy_(w.to(heads.trainable))
            setup.probe[h]["lambda"] = lam


def refresh_heads(setup: Setup, rt, device) -> None:
    """Before a step or an evaluation: re-fit (``head_mode: refit``) or re-centre (``batch``) every
    trainable head on the current features of training rows. Each rank computes its share of the rows and
    all ranks solve the same ridge problem on the gathered features, so heads stay identical under DDP."""
    cfg, heads = setup.cfg, setup.model.heads
    if cfg.head_mode not in ("refit", "batch", "varpro"):
        return
    for td in setup.tasks:
        h = td.spec.head_tag
        if h not in setup.train_heads:
            continue
        feats, y = train_features(setup, td, cfg.refit_rows, device, rt)
        if cfg.head_mode == "batch" or len(feats) < 8:
            heads.set_stats(h, feats.mean(0), heads.stats()[h][1])
            continue
        mu, sd = feature_stats(feats)
        w, lam = ridge_fit((feats - mu) / sd, y, heads.specs[h], seed=cfg.seed)
        heads.set_stats(h, mu, sd)
        with torch.no_grad():
            heads.get(h).copy_(w.to(heads.trainable))
        setup.probe[h] = {"rows": len(feats), "lambda": lam}
