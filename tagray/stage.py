"""One stage of Tag-LLM training, as a plain function a Ray Train worker (or a test) calls.

``run_stage(job, runtime)``: load the frozen base and the previous stage's tag set, build the tag and
head banks (new tags trainable, earlier ones frozen), train on mixed-task batches, validate and report
checkpoints through ``runtime``, then evaluate the best state on the test split and write the artifact.
The three stages differ only in their data (:class:`~tagray.config.StageConfig`), never in code.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .config import StageConfig
from .core.artifacts import TagSet, load_tagset, save_tagset
from .core.base import Base, load_base
from .core.data import BucketBatchSampler, collate, to_device
from .core.errors import ConfigError, InputError
from .core.metrics import accuracy, bleu, lm_metrics, regression_metrics
from .core.model import TagLLM
from .core.tags import HeadBank, HeadSpec, TagBank, head_init, mean_embedding_init
from .core.template import TemplateEncoder
from .tasks.dataset import TaskData, build_task_data, tag_kinds
from .tasks.spec import TaskSpec, load_task

log = logging.getLogger("tagray")


@dataclass
class StageJob:
    """Everything a worker needs to run a stage; plain data so it ships to Ray workers as a dict."""

    stage: StageConfig
    base: str = "smollm2-135m"
    dtype: str = "auto"
    init_from: str | None = None  # resolved tag-set path (local or s3://)
    output: str | None = None  # where the stage's final artifact is written
    run_name: str = "tagray"


class Runtime:
    """Local, single-process runtime. The Ray Train adapter subclasses it (rank, DDP, report, resume)."""

    rank = 0
    world_size = 1

    def __init__(self, device: str | torch.device | None = None, checkpoint_dir: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.checkpoint_dir = checkpoint_dir
        self.reports: list[dict] = []

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir and self.checkpoint_dir:
            import shutil

            shutil.copytree(checkpoint_dir, self.checkpoint_dir, dirs_exist_ok=True)

    def latest_checkpoint(self) -> str | None:
        d = self.checkpoint_dir
        return d if d and os.path.exists(os.path.join(d, "trainer_state.json")) else None

    def log(self, msg: str) -> None:
        if self.rank == 0:
            log.info(msg)


# ---- building the banks ----------------------------------------------------------------------------


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


def _target_stats(td: TaskData) -> HeadSpec:
    spec = td.spec
    if spec.target.kind == "classification":
        return HeadSpec("classification", len(spec.target.classes), classes=spec.target.classes)
    y = torch.tensor([r["_target"] for r in td.splits["train"]], dtype=torch.float64)
    std = y.std(0).clamp_min(1e-6) if len(y) > 1 else torch.ones(y.shape[1], dtype=torch.float64)
    return HeadSpec("regression", y.shape[1], tuple(y.mean(0).tolist()), tuple(std.tolist()))


def build_setup(job: StageJob, base: Base | None = None) -> Setup:
    """Load base, previous tags and task data; create the banks. Pure torch, no Ray."""
    cfg = job.stage.train
    base = base or load_base(job.base, dtype=job.dtype)
    prev = load_tagset(job.init_from, expect_base=base.fingerprint) if job.init_from else None
    specs = [load_task(t) if not isinstance(t, TaskSpec) else t for t in job.stage.tasks]
    tasks = [build_task_data(s) for s in specs]
    eval_tasks = [build_task_data(load_task(t)) for t in job.stage.eval_tasks]

    used: dict[str, str] = {}
    for td in tasks:
        for t, kind in tag_kinds(td.spec, td.tags()).items():
            used.setdefault(t, kind)
    known = dict(prev.tag_info) if prev else {}
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

    emb = base.model.get_input_embeddings().weight
    gen = torch.Generator().manual_seed(cfg.seed)
    entries, info = {}, {}
    for name in list(known) + [t for t in used if t not in known]:
        if name in known and prev is not None:
            entries[name] = prev.tags[name]
            info[name] = dict(known[name])
        else:
            entries[name] = mean_embedding_init(emb, cfg.tag_length, cfg.init_noise, gen)
            info[name] = {"kind": used[name], "length": cfg.tag_length, "stage": job.stage.name}
        if name in train_tags:
            info[name]["stage"] = job.stage.name
    bank = TagBank(entries, trainable=train_tags)

    head_entries, head_specs, train_heads = {}, {}, set()
    if prev:
        head_entries.update(prev.heads)
        head_specs.update(prev.head_specs)
    for td in tasks:
        h = td.spec.head_tag
        if h is None:
            continue
        if h in head_entries and h not in train_tags:
            continue  # a function tag from an earlier stage, frozen with its head
        spec = _target_stats(td)
        if h in train_heads and head_specs[h] != spec:
            raise ConfigError("tasks", f"two tasks train head {h} with different targets")
        head_specs[h] = spec
        head_entries[h] = head_init(emb, spec.out_dim, gen)
        train_heads.add(h)
    stats = dict(prev.head_stats) if prev else {}
    heads = (
        HeadBank(head_entries, head_specs, emb.shape[1], trainable=train_heads, stats=stats)
        if head_entries
        else None
    )
    model = TagLLM(
        base.model, bank, heads, isolate_spans=cfg.isolate_spans, track_momentum=cfg.track_feature_mean
    )
    task_specs = dict(prev.tasks) if prev else {}
    task_specs.update({td.spec.name: td.spec.to_json() for td in tasks + eval_tasks})
    setup = Setup(model, base, tasks, eval_tasks, prev, info, train_tags, train_heads, task_specs)
    for td in tasks:
        h = td.spec.head_tag
        if h in train_heads:
            feats, y = head_features(setup, td, cfg.probe_rows)
            mu, sd = feats.mean(0), (feats.std(0) if len(feats) > 1 else torch.ones(feats.shape[1]))
            # floor tiny stds: a near-constant dimension must not amplify small feature drifts later
            sd = sd.clamp_min(0.1 * float(sd.median()))
            heads.set_stats(h, mu, sd)
            if cfg.head_init == "ridge" and len(feats) >= 8:
                with torch.no_grad():
                    heads.get(h).copy_(ridge_head((feats - mu) / sd.clamp_min(1e-4), y, heads.specs[h]))
    return setup


@torch.no_grad()
def head_features(setup: Setup, td: TaskData, rows: int, batch_size: int = 16):
    """Hidden states a new head reads ``(n, d)`` and the rows' targets ``(n, k)``, on training rows."""
    model = setup.model
    exs = encode_split(setup, [td], "train", rows)
    pad = setup.base.tokenizer.pad_token_id
    order = sorted(range(len(exs)), key=lambda i: len(exs[i].enc))
    exs = [exs[i] for i in order]
    feats = []
    for s in range(0, len(exs), batch_size):
        b = make_batch(model, exs[s : s + batch_size], pad)
        h = model.hidden_states(b)
        feats.append(h[torch.arange(h.shape[0]), b["head_pos"]].float())
    return torch.cat(feats), torch.tensor([e.target for e in exs], dtype=torch.float32)


def ridge_head(z: torch.Tensor, y: torch.Tensor, spec: HeadSpec) -> torch.Tensor:
    """Least-squares head rows ``(out_dim, d+1)`` on standardised features ``z (n, d)``.

    Regression targets are standardised as the loss sees them; classes become one-hot (a least-squares
    classifier). The ridge strength is picked on a held-out fifth of the rows.
    """
    if spec.kind == "regression":
        t = (y - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    else:
        t = F.one_hot(y[:, 0].long(), spec.out_dim).float()
    n, d = z.shape
    z64, t64 = z.double(), t.double()
    cut = max(1, n // 5)

    def solve(a, b, lam):
        return torch.linalg.solve(a.T @ a + lam * torch.eye(d, dtype=a.dtype), a.T @ (b - b.mean(0)))

    best = min(
        (
            float(
                ((z64[:cut] @ solve(z64[cut:], t64[cut:], lam) + t64[cut:].mean(0) - t64[:cut]) ** 2).mean()
            ),
            lam,
        )
        for lam in (1.0, 10.0, 100.0, 1000.0, 10000.0)
    )[1]
    w = solve(z64, t64, best)  # (d, k)
    return torch.cat([w.T, t64.mean(0)[:, None]], 1).float()


# ---- encoding ---------------------------------------------------------------------------------------


def encoder_for(spec: TaskSpec, tokenizer, bank: TagBank, rename=None) -> TemplateEncoder:
    return TemplateEncoder(
        tokenizer,
        spec.template,
        bank.slots,
        char_fields=spec.char_fields,
        lm_field=spec.target.field,
        lm_eos=spec.target.eos,
        head_tag=spec.head_tag,
        rename=rename,
        max_length=spec.max_length,
    )


@dataclass
class Example:
    enc: object
    target: list[float] | None
    task: int


def encode_split(setup: Setup, tasks: list[TaskData], split: str, limit: int | None = None) -> list[Example]:
    out = []
    for i, td in enumerate(tasks):
        enc = encoder_for(td.spec, setup.base.tokenizer, setup.model.tags)
        rows = td.splits[split][:limit] if limit else td.splits[split]
        skipped = 0
        for r in rows:
            try:
                out.append(Example(enc.encode(r), r.get("_target"), i))
            except InputError:
                skipped += 1  # rows over max_length: counted, never silently truncated
        if skipped:
            log.info(
                "task %s/%s: %d rows over max_length %d skipped",
                td.spec.name,
                split,
                skipped,
                td.spec.max_length,
            )
    return out


def make_batch(model: TagLLM, exs: list[Example], pad_id: int, left_pad: bool = False) -> dict:
    names = model.heads.names if model.heads is not None else []
    return collate([e.enc for e in exs], names, [e.target for e in exs], pad_id=pad_id, left_pad=left_pad)


# ---- evaluation --------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: TagLLM,
    setup: Setup,
    tasks: list[TaskData],
    split: str,
    device,
    limit: int | None = None,
    batch_size: int = 16,
    generate: bool = False,
    autocast: torch.dtype | None = None,
) -> dict:
    """Metrics per task on ``split``: ``{task: {metric: value, "loss": ...}}``."""
    was = model.training
    model.eval()
    pad = setup.base.tokenizer.pad_token_id
    results = {}
    for _ti, td in enumerate(tasks):
        exs = encode_split(setup, [td], split, limit)
        if not exs:
            continue
        order = sorted(range(len(exs)), key=lambda i: len(exs[i].enc))  # length-sorted: little padding
        preds, tgts, tot, ntok, rl = [], [], 0.0, 0, []
        for s in range(0, len(order), batch_size):
            chunk = [exs[i] for i in order[s : s + batch_size]]
            batch = to_device(make_batch(model, chunk, pad), device)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                out = model(batch)
            rl.append(out.row_loss.float().cpu())
            if td.spec.target.kind == "lm":
                n = (batch["labels"][:, 1:] != -100).sum(1).cpu()
                tot += float((out.row_loss.float().cpu() * n).sum())
                ntok += int(n.sum())
            else:
                preds.append(out.preds[:, : len(chunk[0].target)].cpu())
                tgts.append(batch["targets"][:, : len(chunk[0].target)].cpu())
        m: dict[str, float] = {"loss": float(torch.cat(rl).mean()), "n": len(exs)}
        kind = td.spec.target.kind
        if kind == "regression":
            p, y = torch.cat(preds), torch.cat(tgts)
            m.update(regression_metrics(p[:, 0], y[:, 0]))
            m["baseline_mse"] = float(((y[:, 0] - model.heads.specs[td.spec.head_tag].mean[0]) ** 2).mean())
        elif kind == "classification":
            m.update(accuracy(torch.cat(preds)[:, 0], torch.cat(tgts)[:, 0]))
        else:
            m.update(lm_metrics(tot, ntok))
            if generate and "bleu" in td.spec.metrics:
                rows = td.splits[split][:limit] if limit else td.splits[split]
                hyps = generate_text(
                    model,
                    setup,
                    td.spec,
                    rows,
                    device,
                    batch_size=batch_size,
                    max_new_tokens=td.spec.generate.get("max_new_tokens", 48),
                )
                m.update(bleu(hyps, [r[td.spec.target.field] for r in rows]))
                m["examples"] = [
                    {"src": r.get("src"), "ref": r[td.spec.target.field], "hyp": h}
                    for r, h in list(zip(rows, hyps, strict=True))[:3]
                ]
        results[td.spec.name] = m
    model.train(was)
    return results


@torch.no_grad()
def generate_text(
    model: TagLLM,
    setup: Setup | None,
    spec: TaskSpec,
    rows: list[dict],
    device,
    batch_size: int = 16,
    max_new_tokens: int = 48,
    tokenizer=None,
    rename=None,
) -> list[str]:
    """Greedy generation of ``spec.target.field`` for each row, tags spliced into the prompt."""
    tok = tokenizer or setup.base.tokenizer
    enc = encoder_for(spec, tok, model.tags, rename)
    outs = []
    for s in range(0, len(rows), batch_size):
        encs = [enc.encode(r, with_target=False) for r in rows[s : s + batch_size]]
        batch = collate(encs, pad_id=tok.pad_token_id, left_pad=True)
        batch = to_device(batch, device)
        emb = model.embed(batch["input_ids"], batch["tag_rows"])
        gen = model.base.generate(
            inputs_embeds=emb,
            attention_mask=batch["attention_mask"],
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        for g in gen:
            outs.append(tok.decode(g, skip_special_tokens=True).strip())
    return outs


# ---- checkpoints ------------------------------------------------------------------------------------


def current_tagset(setup: Setup, metrics: dict | None = None, stage: str | None = None) -> TagSet:
    m = setup.model
    heads = m.heads.state() if m.heads is not None else {}
    specs = dict(m.heads.specs) if m.heads is not None else {}
    prev_metrics = dict(setup.prev.metrics) if setup.prev else {}
    prev_metrics.update(metrics or {})
    return TagSet(
        tags=m.tags.state(),
        heads=heads,
        tag_info=setup.tag_info,
        head_specs=specs,
        base=setup.base.fingerprint,
        tasks=setup.task_specs,
        metrics=prev_metrics,
        stage=stage,
        head_stats=m.heads.stats() if m.heads is not None else {},
    )


def save_checkpoint(path: str, setup: Setup, opt: torch.optim.Optimizer, state: dict, stage: str) -> None:
    save_tagset(current_tagset(setup, stage=stage), path)
    flat = {}
    for i, p in enumerate(setup.model.trainable_parameters()):
        st = opt.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                flat[f"{i}.{k}"] = st[k].detach().cpu().contiguous()
        if "step" in st:
            state.setdefault("opt_step", {})[str(i)] = float(st["step"])
    save_file(flat, os.path.join(path, "optimizer.safetensors"))
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        json.dump(state, f)


def load_checkpoint(path: str, setup: Setup, opt: torch.optim.Optimizer) -> dict:
    ts = load_tagset(path, expect_base=setup.base.fingerprint)
    m = setup.model
    with torch.no_grad():
        for name in setup.train_tags:
            m.tags.get(name).copy_(ts.tags[name])
        for name in setup.train_heads:
            m.heads.get(name).copy_(ts.heads[name])
            if name in ts.head_stats:  # the running feature mean moves during training
                m.heads.set_stats(name, ts.head_stats[name][0], ts.head_stats[name][1])
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    flat = load_file(os.path.join(path, "optimizer.safetensors"))
    for i, p in enumerate(m.trainable_parameters()):
        if f"{i}.exp_avg" in flat:
            opt.state[p] = {
                "exp_avg": flat[f"{i}.exp_avg"].to(p.device),
                "exp_avg_sq": flat[f"{i}.exp_avg_sq"].to(p.device),
                "step": torch.tensor(state.get("opt_step", {}).get(str(i), 0.0)),
            }
    return state


# ---- the stage ---------------------------------------------------------------------------------------


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


def run_stage(
    job: StageJob, runtime: Runtime | None = None, base: Base | None = None, config_hash: str | None = None
) -> tuple[TagSet, dict]:
    """Train one stage; returns the final tag set (best validation state) and its test metrics."""
    rt = runtime or Runtime()
    cfg = job.stage.train
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    setup = build_setup(job, base)
    model = setup.model
    device = rt.device
    autocast = torch.bfloat16 if device.type == "cuda" else None
    wrapped = rt.wrap(model)
    params = model.trainable_parameters()
    if not params:
        raise ConfigError("train_tags", f"stage {job.stage.name!r} has nothing to train")
    groups = [{"params": [model.tags.trainable], "lr": cfg.lr}] if model.tags.trainable.requires_grad else []
    if model.heads is not None and model.heads.trainable.requires_grad:
        groups.append({"params": [model.heads.trainable], "lr": cfg.head_lr or cfg.lr / 10})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(int(cfg.warmup_ratio * cfg.max_steps), cfg.max_steps)
    )
    n_trainable = sum(p.numel() for p in params)
    rt.log(
        f"stage {job.stage.name}: training {sorted(setup.train_tags)} + heads {sorted(setup.train_heads)} "
        f"({n_trainable:,} parameters); frozen tags {sorted(set(setup.tag_info) - setup.train_tags)}"
    )

    train = encode_split(setup, setup.tasks, "train")
    sampler = BucketBatchSampler(
        [len(e.enc) for e in train],
        cfg.batch_size,
        seed=cfg.seed,
        num_replicas=rt.world_size,
        rank=rt.rank,
        bucketing=cfg.bucketing,
    )
    state = {"step": 0, "epoch": 0, "best": None, "best_step": None, "history": []}
    best_state = None
    ckpt = rt.latest_checkpoint()
    if ckpt:
        state = load_checkpoint(ckpt, setup, opt)
        sched.last_epoch = state["step"]
        best_dir = os.path.join(ckpt, "best")
        if os.path.exists(os.path.join(best_dir, "tagset.json")):
            best = load_tagset(best_dir)
            best_state = (
                {n: best.tags[n] for n in setup.train_tags},
                {n: best.heads[n] for n in setup.train_heads},
                {n: best.head_stats[n] for n in setup.train_heads if n in best.head_stats},
            )
        state["resumed_from_step"] = state["step"]
        rt.log(f"stage {job.stage.name}: resumed from step {state['step']}")

    pad = setup.base.tokenizer.pad_token_id
    if state["step"] == 0 and setup.train_heads:
        # score the initial (ridge-initialised) heads too, so the best state is never worse than the probe
        best_state = _validate_and_report(
            rt, job, setup, opt, state, device, autocast, [0.0], 0.0, best_state, report=False
        )
    model.train()
    t0, tokens, losses = time.time(), 0, []
    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.max_steps,
        initial=state["step"],
        desc=f"stage {job.stage.name}",
        disable=rt.rank != 0 or not os.environ.get("TAGRAY_PROGRESS", "1") == "1",
        mininterval=5,
    )
    while state["step"] < cfg.max_steps:
        sampler.set_epoch(state["epoch"])
        batches = list(sampler)
        # resume mid-epoch at the right batch: skip what this epoch already consumed
        skip = state.get("batch_in_epoch", 0)
        for bi, idx in enumerate(batches):
            if bi < skip:
                continue
            batch = to_device(make_batch(model, [train[i] for i in idx], pad), device)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                out = wrapped(batch)
            if out.loss is None:
                continue
            (out.loss / cfg.grad_accum).backward()
            tokens += int(batch["attention_mask"].sum())
            losses.append(float(out.loss.detach()))
            state["batch_in_epoch"] = bi + 1
            if (bi + 1) % cfg.grad_accum:
                continue
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state["step"] += 1
            bar.update(1)
            step = state["step"]
            if step % cfg.log_every == 0:
                bar.set_postfix(loss=f"{sum(losses[-cfg.log_every :]) / len(losses[-cfg.log_every :]):.4f}")
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                best_state = _validate_and_report(
                    rt,
                    job,
                    setup,
                    opt,
                    state,
                    device,
                    autocast,
                    losses,
                    tokens / max(time.time() - t0, 1e-9),
                    best_state,
                )
            if step >= cfg.max_steps:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    bar.close()

    # restore the best validation state, then score it on the held-out test split
    if best_state is not None:
        with torch.no_grad():
            for n, t in best_state[0].items():
                model.tags.get(n).copy_(t)
            for n, t in best_state[1].items():
                model.heads.get(n).copy_(t)
            for n, st in best_state[2].items():
                model.heads.set_stats(n, st[0], st[1])
    test = {}
    if rt.rank == 0:
        test = evaluate(
            model, setup, setup.tasks + setup.eval_tasks, "test", device, generate=True, autocast=autocast
        )
    metrics = {name: {"test": m, "stage": job.stage.name} for name, m in test.items()}
    final = current_tagset(setup, metrics, stage=job.stage.name)
    final.meta = {
        "run": job.run_name,
        "base": job.base,
        "best_step": state.get("best_step"),
        "steps": state["step"],
        "train_config": asdict(cfg),
        "tasks": [td.spec.name for td in setup.tasks],
        "config_hash": config_hash,
        "resumed_from_step": state.get("resumed_from_step"),
    }
    if rt.rank == 0 and job.output:
        save_tagset(final, job.output)
        rt.log(f"stage {job.stage.name}: artifact written to {job.output}")
    return final, test


def _validate_and_report(
    rt, job, setup, opt, state, device, autocast, losses, tok_per_s, best_state, report: bool = True
):
    cfg = job.stage.train
    step = state["step"]
    metrics = {
        "step": step,
        "train_loss": sum(losses[-cfg.eval_every :]) / max(1, len(losses[-cfg.eval_every :])),
        "tokens_per_s": tok_per_s,
    }
    if rt.rank == 0:
        val = evaluate(
            setup.model, setup, setup.tasks, "valid", device, limit=cfg.eval_rows, autocast=autocast
        )
        metrics["val_loss"] = sum(m["loss"] for m in val.values()) / max(1, len(val))
        for t, m in val.items():
            for k, v in m.items():
                if isinstance(v, (int, float)):
                    metrics[f"val/{t}/{k}"] = v
        score = metrics.get(cfg.select_metric, metrics["val_loss"])
        if state["best"] is None or score < state["best"]:
            state["best"], state["best_step"] = score, step
            best_state = (
                {n: setup.model.tags.get(n).detach().clone() for n in setup.train_tags},
                {n: setup.model.heads.get(n).detach().clone() for n in setup.train_heads},
                {n: st for n, st in setup.model.heads.stats().items() if n in setup.train_heads}
                if setup.model.heads is not None
                else {},
            )
        metrics["best_val"] = state["best"]
        state["history"].append({k: v for k, v in metrics.items() if not k.startswith("val/")})
        rt.log(
            f"stage {job.stage.name} step {step}: train_loss {metrics['train_loss']:.4f} "
            f"val_loss {metrics['val_loss']:.4f} ({tok_per_s:,.0f} tok/s)"
        )
    if not report:
        return best_state
    with tempfile.TemporaryDirectory(prefix="tagray-ckpt-") as d:
        if rt.rank == 0:
            save_checkpoint(d, setup, opt, dict(state), job.stage.name)
            if best_state is not None:
                ts = current_tagset(setup, stage=job.stage.name)
                ts.tags.update({n: t.cpu() for n, t in best_state[0].items()})
                ts.heads.update({n: t.cpu() for n, t in best_state[1].items()})
                ts.head_stats.update(best_state[2])
                save_tagset(ts, os.path.join(d, "best"))
        rt.report(metrics, d if rt.rank == 0 else None)
    return best_state
