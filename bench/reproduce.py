"""Reproduction table: the Tag-LLM paper's comparisons on SmolLM2-135M and the packaged real data.

For every task (default QED, LogP, Descriptor and the AMP classification task) and every split seed
(``split.seed``: another random hash split per seed, default 3 seeds), on exactly the same rows:

- ``tag-llm``: tagray at the shipped stage-2 recipe (read from ``jobs/pipeline.yaml``, stage ``single``:
  varpro, normalised steps, p = 2), after the stage-1 domain tags of ``--domain``;
- ``step 0``: the state that run starts from (mean-embedding function tag + ridge probe through the
  template), which is also the "untrained function tag" ablation;
- ``ridge probe``: ridge on the frozen model's last hidden state of the tag-free prompt, every training
  row, lambda by 5-fold CV on a random permutation;
- ``prompt-tuning+head`` / ``lora+head``: Hugging Face PEFT (as many virtual tokens as tagray's domain +
  function tags; LoRA r = 8 on q/v) with the same kind of head, AdamW over ``--peft-epochs`` passes of the
  same rows, the best validation state kept;
- ``expert``: ``tagray baseline``'s scikit-learn models (Morgan fingerprints, RDKit descriptors, protein
  composition), the one best on the validation split; ``train-mean``: the training mean (class prior).

Ablations on ``--ablation-tasks`` (same seeds): no domain tag (removed from the template), no regression
head (the value written as text after the function tag, LM loss, generated and parsed); a function-tag
length sweep. With a stage-3 artifact (``--cross``, e.g. ``runs/demo/cross``): the translation tags'
LM loss on seen and zero-shot language pairs against the untagged prompt and the tag names as plain text.

Every number is written to ``bench/results/reproduce.json`` and ``docs/reproduction.md`` is generated from
it (mean +- std over the seeds, seconds per method). Run::

    python bench/reproduce.py                 # every task, 3 seeds: hours on a 2-core CPU (see the page)
    python bench/reproduce.py --smoke         # tiny random model, a few rows: code paths only
"""

# ruff: noqa: B023  (the per-task lambdas below are called inside their own loop iteration)
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: bench/ is a package

from bench.harness import add_options  # noqa: E402
from tagray.config import parse_pipeline
from tagray.core.artifacts import is_tagset, load_tagset
from tagray.core.base import Base, load_base
from tagray.core.data import BucketBatchSampler, collate
from tagray.core.errors import InputError
from tagray.core.heads import HeadSpec, ridge_fit
from tagray.core.metrics import classification_metrics, regression_metrics
from tagray.core.model import TagLLM
from tagray.core.tags import TagBank
from tagray.core.template import TemplateEncoder
from tagray.tasks.dataset import build_task_data
from tagray.tasks.spec import load_task
from tagray.train.batches import encode_rows, encoder_for
from tagray.train.evaluate import generate_text
from tagray.train.job import Runtime, StageJob
from tagray.train.recipe import run_stage
from tagray.train.setup import build_setup, target_spec
from tagray.util import load_yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOMAIN_TAG = {"qed": "<SMILES>", "logp": "<SMILES>", "descriptor": "<Protein>", "amp": "<Protein>"}
RECIPE_KEYS = ("tag_length", "head_mode", "optimizer", "lr", "epochs", "eval_every", "refit_rows")

# Tag-LLM paper, LLaMA-7B (MSE; ../shared/docs/tag-llm-method.md). LogP and AMP are not in the paper.
PAPER = {
    "tag-llm": {"descriptor": 0.005, "qed": 0.008},
    "lora+head": {"descriptor": 0.007, "qed": 0.015},
    "prompt-tuning+head": {"descriptor": 0.008, "qed": 0.0083},
    "ridge probe": {"descriptor": 0.041, "qed": 0.012},
    "expert": {"descriptor": 0.012, "qed": 0.040},
}


class Quiet(Runtime):
    """tagray's local runtime without per-step logging (the table is the output)."""

    def log(self, msg: str) -> None:
        pass


def shipped_recipe() -> dict:
    """The stage-2 train settings of ``jobs/pipeline.yaml`` (what ``make demo`` trains function tags with)."""
    cfg = load_yaml(str(ROOT / "jobs" / "pipeline.yaml"))
    stage = next(s for s in cfg["stages"] if s["name"] == "single")
    return {k: v for k, v in stage.get("train", {}).items() if k in RECIPE_KEYS}


def seeded(name: str, seed: int, **over) -> dict:
    """Builtin task ``name`` on the random split of ``seed`` (``split.seed``; 0 is its frozen split)."""
    return {"task": name, "split": {**load_task(name).raw.get("split", {}), "seed": seed}, **over}


def pipeline(args, tasks: list, train: dict | None = None, **stage) -> StageJob:
    """A one-stage job over ``tasks`` at the shipped recipe (``train`` overrides it)."""
    t = {
        **args.recipe,
        "batch_size": args.train_rows,  # varpro: every training row of a task in one step
        "eval_rows": args.valid_rows,
        "seed": 0,
        **(train or {}),
    }
    cfg = parse_pipeline(
        {"name": "reproduce", "stages": [{"name": "s", "tasks": tasks, "train": t, **stage}]}
    )
    return cfg.stages[0]


def limits(args) -> dict:
    return {"train": args.train_rows, "valid": args.valid_rows, "test": args.test_rows}


# ---- tagray runs -----------------------------------------------------------------------------------------


def train_domain(args, base: Base) -> str:
    """Stage 1 (``<SMILES>``, ``<Protein>``) written under ``--work`` when no ``--domain`` artifact is given."""
    out = str(Path(args.work) / "domain")
    if is_tagset(out):
        return out
    lim = {"train": args.domain_rows, "valid": 40, "test": 40}
    st = pipeline(
        args,
        [{"task": "smiles_lm", "limits": lim}, {"task": "protein_lm", "limits": lim}],
        {"optimizer": "adamw", "lr": args.domain_lr, "batch_size": 8, "max_steps": args.domain_steps,
         "epochs": None, "eval_every": args.domain_steps, "tag_length": 10, "head_mode": "refit"},
    )  # fmt: skip
    run_stage(StageJob(st, output=out), Quiet(device=args.device), base=base)
    return out


def tagray_run(args, base: Base, task: dict, init: str | None, train: dict | None = None, **stage) -> dict:
    """Train one stage with tagray; test metrics of its (only) task, its step-0 metrics and kept step."""
    st = pipeline(args, [task], train, **stage)
    ts, test = run_stage(StageJob(st, init_from=init), Quiet(device=args.device), base=base)
    name = next(iter(test))
    m = dict(test[name])
    info = ts.metrics[name]
    m["trainable"] = sum(ts.tags[n].numel() for n in ts.tag_info if ts.tag_info[n]["stage"] == "s") + sum(
        h.numel() for h in ts.heads.values()
    )
    m["kept_step"] = info.get("kept_step")
    m["_step0"] = info.get("step0", {})
    return m


def no_head_run(args, base: Base, task: dict, init: str) -> dict:
    """The value written as text after the function tag (LM loss), then generated greedily and parsed."""
    spec = load_task(task)
    col = spec.target.columns[0]
    text = {
        **task,
        "name": f"{spec.name}_text",
        "derive": {**spec.derive, f"{col}_text": {"fn": "format.decimal", "args": [col]}},
        "template": spec.template + " {" + col + "_text}",
        "target": {"kind": "lm", "field": f"{col}_text", "eos": True},
        "metrics": ["loss"],
        "limits": limits(args),
    }
    lm = {"optimizer": "adamw", "lr": args.nohead_lr, "batch_size": 8, "max_steps": args.nohead_steps,
          "epochs": None, "eval_every": max(1, args.nohead_steps // 2), "head_mode": "refit"}  # fmt: skip
    st = pipeline(args, [{"task": text, "limits": limits(args)}], lm, train_tags=[spec.function_tag])
    ts, _ = run_stage(StageJob(st, init_from=init), Quiet(device=args.device), base=base)
    tspec = load_task(text)
    model = TagLLM(base.model, TagBank(ts.tags)).to(args.device).eval()
    data = build_task_data(tspec)
    rows = encodable(tspec, base, model, data.splits["test"][: args.test_rows])
    hyps = generate_text(model, base.tokenizer, tspec, rows, torch.device(args.device), 16, 8)
    train_mean = statistics.fmean(r[col] for r in data.splits["train"])
    preds, bad = [], 0
    for h in hyps:
        m = re.search(r"-?\d+(?:\.\d+)?", h)
        if m is None or not math.isfinite(float(m.group())):
            bad += 1
            preds.append(train_mean)  # an unparseable answer scores as the training mean
        else:
            preds.append(float(m.group()))
    out = regression_metrics(torch.tensor(preds), torch.tensor([r[col] for r in rows]))
    out.update({"unparsed": bad, "n": len(rows), "examples": hyps[:3]})
    return out


def encodable(spec, base: Base, model: TagLLM, rows: list[dict]) -> list[dict]:
    """The rows whose prompt fits ``spec.max_length`` (tagray skips longer ones in training and tests too)."""
    enc = encoder_for(spec, base.tokenizer, model.tags)
    out = []
    for r in rows:
        try:
            enc.encode(r, with_target=False)
            out.append(r)
        except InputError:
            pass
    return out


# ---- PEFT baselines and the ridge probe ---------------------------------------------------------------


class Rows:
    """One task's rows encoded by tagray, with the tag positions dropped for the tag-free baselines."""

    def __init__(self, args, base: Base, task: dict):
        st = pipeline(args, [{"task": task, "limits": limits(args)}], {"head_init": "paper", "probe_rows": 8})
        setup = build_setup(StageJob(st), base)
        self.spec: HeadSpec = target_spec(setup.tasks[0])
        self.n_tags = sum(setup.model.tags.length(t) for t in setup.model.tags.names)
        self.split = {}
        for s in ("train", "valid", "test"):
            exs = encode_rows(setup.tasks, base.tokenizer, setup.model.tags, s)
            ids = [[i for i, t in zip(e.enc.ids, e.enc.tag_rows, strict=True) if t < 0] for e in exs]
            self.split[s] = (ids, torch.tensor([e.target for e in exs], dtype=torch.float32))


def batch_ids(ids: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(B, T)`` ids, mask, and each row's last position ``(B,)``."""
    T = max(map(len, ids))
    x = torch.full((len(ids), T), pad, dtype=torch.long)
    m = torch.zeros(len(ids), T, dtype=torch.long)
    for i, r in enumerate(ids):
        x[i, : len(r)] = torch.tensor(r)
        m[i, : len(r)] = 1
    return x, m, torch.tensor([len(r) - 1 for r in ids])


class HeadOnFeatures(nn.Module):
    """A linear head ``d -> out_dim`` on standardised last-position features of a (PEFT-wrapped) model."""

    def __init__(self, features, d: int, out_dim: int):
        super().__init__()
        self.features = features  # ids, mask, last -> (B, d)
        self.w = nn.Parameter(torch.zeros(out_dim, d + 1))
        self.register_buffer("mu", torch.zeros(d))
        self.register_buffer("sd", torch.ones(d))

    def forward(self, ids, mask, last) -> torch.Tensor:
        z = (self.features(ids, mask, last).float() - self.mu) / self.sd
        return z @ self.w[:, :-1].T + self.w[:, -1]  # (B, out_dim): standardised values or class logits


@torch.no_grad()
def all_features(features, ids: list[list[int]], pad: int, bs: int = 16) -> torch.Tensor:
    out = []
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for s in range(0, len(order), bs):
        idx = order[s : s + bs]
        out.append(features(*batch_ids([ids[i] for i in idx], pad)).float())
    f = torch.cat(out)
    return f[torch.argsort(torch.tensor(order))]


def init_head(head: HeadOnFeatures, rows: Rows, pad: int, seed: int = 0) -> None:
    """The same start as tagray's heads: standardisation stats and a ridge fit on every training row
    (lambda by 5-fold CV on a random permutation)."""
    ids, y = rows.split["train"]
    f = all_features(head.features, ids, pad)
    sd = f.std(0)
    head.mu.copy_(f.mean(0))
    head.sd.copy_(sd.clamp_min(0.1 * float(sd.median())))
    with torch.no_grad():
        w, _ = ridge_fit((f - head.mu) / head.sd, y, rows.spec, seed=seed)
        head.w.copy_(w)


def metrics_of(spec: HeadSpec, raw: torch.Tensor, y: torch.Tensor) -> dict:
    if spec.kind == "regression":
        return regression_metrics(spec.decode(raw)[:, 0], y[:, 0])
    return classification_metrics(spec.decode(raw), y[:, 0].long())


def evaluate_head(head: HeadOnFeatures, rows: Rows, split: str, pad: int, limit: int | None = None) -> dict:
    ids, y = rows.split[split]
    ids, y = ids[:limit], y[:limit]
    head.eval()
    raw = all_features(lambda *b: head(*b), ids, pad)
    head.train()
    out = metrics_of(rows.spec, raw, y)
    out["loss"] = float(rows.spec.loss(raw, y).mean())
    return out


def peft_run(args, base: Base, rows: Rows, kind: str) -> dict:
    """PEFT prompt tuning or LoRA + linear head from the ridge probe, AdamW, best validation state kept."""
    from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model

    torch.manual_seed(args.peft_seed)
    pad = base.tokenizer.pad_token_id
    if kind == "prompt":
        cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=rows.n_tags)
    else:
        cfg = LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]
        )
    # a private copy: PEFT wraps (LoRA: patches) the model it gets; the shared base must stay untouched
    pm = get_peft_model(copy.deepcopy(base.model), cfg)
    backbone = pm.get_base_model().base_model  # the transformer without its LM head: no vocabulary logits
    emb = pm.get_base_model().get_input_embeddings()
    nv = rows.n_tags if kind == "prompt" else 0

    def features(ids, mask, last):
        x = emb(ids)
        if nv:  # PEFT's learned virtual tokens, prepended as PEFT does
            x = torch.cat([pm.get_prompt(batch_size=len(ids)).to(x.dtype), x], 1)
            mask = torch.cat([mask.new_ones(len(ids), nv), mask], 1)
        h = backbone(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
        return h[torch.arange(len(ids)), last + nv]

    head = HeadOnFeatures(features, emb.weight.shape[1], rows.spec.out_dim)
    init_head(head, rows, pad, args.peft_seed)
    trainable = [p for p in pm.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable) + head.w.numel()
    return {**train_head_model(args, head, trainable, rows, pad), "trainable": n_trainable}


def train_head_model(args, head: HeadOnFeatures, params: list, rows: Rows, pad: int) -> dict:
    ids, y = rows.split["train"]
    steps = max(1, math.ceil(args.peft_epochs * len(ids) / args.peft_batch))
    every = max(1, steps // args.peft_evals)
    groups = [{"params": params, "lr": args.peft_lr}, {"params": [head.w], "lr": args.peft_lr / 10}]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    warm = max(1, int(0.03 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warm
            if s < warm
            else 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, steps - warm))))
        ),
    )
    sampler = BucketBatchSampler([len(r) for r in ids], args.peft_batch, seed=args.peft_seed)
    state = lambda: [p.detach().clone() for p in [*params, head.w]]  # noqa: E731
    best = (evaluate_head(head, rows, "valid", pad)["loss"], state(), 0)
    step, epoch = 0, 0
    while step < steps:
        sampler.set_epoch(epoch)
        for idx in sampler:
            x, m, last = batch_ids([ids[i] for i in idx], pad)
            loss = rows.spec.loss(head(x, m, last), y[idx]).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([*params, head.w], 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % every == 0 or step == steps:
                v = evaluate_head(head, rows, "valid", pad)["loss"]
                if v < best[0]:
                    best = (v, state(), step)
            if step >= steps:
                break
        epoch += 1
    with torch.no_grad():
        for p, s in zip([*params, head.w], best[1], strict=True):
            p.copy_(s)
    return {**evaluate_head(head, rows, "test", pad), "kept_step": best[2], "steps": steps}


def ridge_probe(args, base: Base, rows: Rows) -> dict:
    """Ridge on the frozen model's last hidden state of the tag-free prompt (all training rows)."""
    pad = base.tokenizer.pad_token_id
    bb = base.model.base_model

    def features(ids, mask, last):
        return bb(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[
            torch.arange(len(ids)), last
        ]

    head = HeadOnFeatures(features, base.model.get_input_embeddings().weight.shape[1], rows.spec.out_dim)
    init_head(head, rows, pad, args.peft_seed)
    return {**evaluate_head(head, rows, "test", pad), "trainable": head.w.numel()}


def expert(task: dict) -> tuple[dict, dict]:
    """``tagray baseline``'s best model on the validation split (test metrics) and the train mean."""
    from tagray.baselines import fit_baselines

    b = fit_baselines(load_task(task))
    best = dict(b["models"][b["best"]]["test"])
    best["model"] = b["best"]
    return best, dict(b["models"]["mean"]["test"])


# ---- translation: learned tags vs the untagged prompt vs the tag names as text ------------------------


def _lm_loss(model: TagLLM, exs, pad: int, device) -> float:
    """Mean LM loss per target token of encoded rows (``Example``s) under ``model``."""
    tot = n = 0.0
    model.eval()
    with torch.no_grad():
        for s in range(0, len(exs), 16):
            chunk = [e.enc for e in exs[s : s + 16]]
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id=pad).items()}
            out = model(batch)
            ntok = (batch["labels"][:, 1:] != -100).sum(1).float()
            tot += float((out.row_loss * ntok).sum())
            n += float(ntok.sum())
    return tot / max(n, 1.0)


def translation_losses(args, base: Base, cross: str) -> dict:
    """Test LM loss of the target sentence: learned tags (the stage-3 artifact), the same prompt without
    tags, and with every tag name written as ordinary text (``<FR>``, ``<Translate>`` as tokens)."""
    ts = load_tagset(cross, expect_base=base.fingerprint)
    model = TagLLM(base.model, TagBank(ts.tags)).to(args.device)
    tok, pad, out = base.tokenizer, base.tokenizer.pad_token_id, {}
    for name in ("translate", "translate_zeroshot"):
        spec = load_task(name)
        data = build_task_data(spec)
        rows = data.splits["test"][: args.translate_rows]
        tagged = [e for e in encode_rows([_only(data, rows)], tok, model.tags, "test")]
        plain = [e for e in encode_rows([_only(data, rows)], tok, model.tags, "test", drop_tags=True)]
        # the tag names as text: each tag becomes a field that holds its own name
        text_tpl = re.sub(r"<\{(\w+)\}>", r"{\1_name}", spec.template)
        text_tpl = re.sub(r"<(\w+)>", lambda m: "{tag_" + m.group(1) + "}", text_tpl)
        enc = TemplateEncoder(
            tok,
            text_tpl,
            model.tags.slots,
            lm_field=spec.target.field,
            lm_eos=True,
            max_length=spec.max_length,
        )
        texts = []
        for r in rows:
            names = {f"{k}_name": f"<{r[k]}>" for k in ("src_lang", "tgt_lang")}
            try:
                texts.append(_Ex(enc.encode({**r, **names, "tag_Translate": "<Translate>"})))
            except InputError:  # over max_length as text: skipped, as such rows are when tagged
                pass
        out[name] = {
            "pairs": sorted({f"{r['src_lang']}->{r['tgt_lang']}" for r in rows}),
            "n": len(tagged),
            "learned tags": _lm_loss(model, tagged, pad, args.device),
            "untagged prompt": _lm_loss(model, plain, pad, args.device),
            "tag names as text": _lm_loss(model, texts, pad, args.device),
        }
    return out


class _Ex:
    def __init__(self, enc):
        self.enc = enc


def _only(data, rows):
    """``data`` with its test split replaced by ``rows``."""
    return type(data)(**{**data.__dict__, "splits": {**data.splits, "test": rows}})


# ---- driver ------------------------------------------------------------------------------------------------

KEEP = ("mse", "mae", "pearson", "spearman", "accuracy", "roc_auc", "f1", "loss", "trainable", "unparsed",
        "n", "kept_step", "steps", "model")  # fmt: skip


def row(m: dict, seconds: float | None = None) -> dict:
    out = {k: m[k] for k in KEEP if k in m}
    if seconds is not None:
        out["seconds"] = round(seconds, 1)
    return out


def run(args) -> dict:
    os.environ.setdefault("TAGRAY_PROGRESS", "0")
    torch.set_num_threads(args.threads)
    if args.smoke:
        from tagray.core.tiny import tiny_base

        base = tiny_base()
    else:
        base = load_base(args.base)
    res: dict = {"config": {**vars(args)}, "machine": machine(), "runs": {}, "ablations": {}, "sweep": {}}
    t0 = time.time()
    domain = args.domain if args.domain and is_tagset(args.domain) else train_domain(args, base)
    res["domain_artifact"] = domain
    log(f"domain tags: {domain} ({time.time() - t0:.0f} s); recipe {args.recipe}")

    def record(where: dict, method: str, task: str, seed: int, m: dict, t: float) -> None:
        where.setdefault(method, {}).setdefault(task, {})[str(seed)] = row(m, time.time() - t)
        key = "mse" if "mse" in m else "accuracy"
        log(f"{task:>10} seed {seed} {method:<34} {key} {fmt(m.get(key))}  ({time.time() - t:.0f} s)")

    for seed in args.seeds:
        for name in args.tasks:
            task = seeded(name, seed)
            spec = load_task(task)
            t = time.time()
            m = tagray_run(args, base, {"task": task, "limits": limits(args)}, domain)
            record(res["runs"], "tag-llm", name, seed, m, t)
            record(res["runs"], "step 0", name, seed, m["_step0"], time.time())
            t = time.time()
            best, mean = expert({**task, "limits": limits(args)})
            record(res["runs"], "expert", name, seed, best, t)
            record(res["runs"], "train-mean", name, seed, mean, time.time())
            rows = Rows(args, base, task)
            methods = {"ridge probe": lambda: ridge_probe(args, base, rows)}
            if spec.target.kind in args.peft_kinds:
                methods["prompt-tuning+head"] = lambda: peft_run(args, base, rows, "prompt")
                methods["lora+head"] = lambda: peft_run(args, base, rows, "lora")
            for method, fn in methods.items():
                t = time.time()
                record(res["runs"], method, name, seed, fn(), t)
        for name in args.ablation_tasks:
            spec = load_task(name)
            dtag = DOMAIN_TAG[name]
            lim = limits(args)
            runs = {
                "no domain tag": lambda: tagray_run(
                    args,
                    base,
                    {
                        "task": seeded(name, seed, template=spec.template.replace(dtag + " ", "")),
                        "limits": lim,
                    },
                    None,
                ),  # fmt: skip
                "no regression head (value as text)": lambda: no_head_run(
                    args, base, seeded(name, seed), domain
                ),
            }
            for variant, fn in runs.items():
                t = time.time()
                record(res["ablations"], variant, name, seed, fn(), t)
            for p in args.lengths:
                if p == args.recipe.get("tag_length") and name in args.tasks:
                    res["sweep"].setdefault(str(p), {}).setdefault(name, {})[str(seed)] = res["runs"][
                        "tag-llm"
                    ][name][str(seed)]
                    continue
                t = time.time()
                m = tagray_run(
                    args, base, {"task": seeded(name, seed), "limits": lim}, domain, {"tag_length": p}
                )
                record(res["sweep"], str(p), name, seed, m, t)
    if args.cross and is_tagset(args.cross):  # e.g. runs/demo/cross from `make demo`
        res["translation"] = translation_losses(args, base, args.cross)
        res["translation_artifact"] = args.cross
        log(f"translation LM loss: {json.dumps(res['translation'])}")
    res["summary"] = summarize(res)
    res["seconds"] = time.time() - t0
    return res


def _stats(per_seed: dict, key: str) -> dict | None:
    vals = [m[key] for m in per_seed.values() if m.get(key) is not None and math.isfinite(m[key])]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "n": len(vals)}  # fmt: skip


def summarize(res: dict) -> dict:
    """Mean and std over seeds of every method x task x metric (what the page shows)."""
    out = {}
    for part in ("runs", "ablations", "sweep"):
        for method, per_task in res[part].items():
            for task, per_seed in per_task.items():
                for key in ("mse", "pearson", "accuracy", "roc_auc", "seconds"):
                    s = _stats(per_seed, key)
                    if s is not None:
                        out.setdefault(part, {}).setdefault(method, {}).setdefault(task, {})[key] = s
    return out


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_start": list(os.getloadavg()),
    }


def log(msg: str) -> None:
    print(msg, flush=True)


def fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def pm(s: dict | None, digits: int = 4) -> str:
    if not s:
        return "-"
    return f"{fmt(s['mean'], digits)} ± {fmt(s['std'], 2)}" if s["n"] > 1 else fmt(s["mean"], digits)


def markdown(res: dict, command: str) -> str:
    a, S = res["config"], res["summary"]
    tasks, seeds = a["tasks"], a["seeds"]
    kinds = {t: load_task(t).target.kind for t in tasks}
    key = {t: "mse" if kinds[t] == "regression" else "accuracy" for t in tasks}
    L = [
        "# Reproduction: Tag-LLM against its baselines on SmolLM2-135M",
        "",
        "Generated by `bench/reproduce.py` from `bench/results/reproduce.json` (every number below). Command:",
        "",
        f"```bash\n{command}\n```",
        "",
        f"Base `{a['base']}` (fp32, frozen). {len(seeds)} split seeds ({', '.join(map(str, seeds))}: "
        f"`split.seed`, a different random hash split per seed; every method sees the same rows of a seed); "
        f"per task {a['train_rows']} training, {a['valid_rows']} validation and up to {a['test_rows']} test "
        f"rows. Cells: mean ± std over the seeds of the test metric (MSE, lower is better; accuracy for "
        f"classification, higher is better).",
        "",
        f"- **tag-llm**: the shipped stage-2 recipe `{json.dumps(a['recipe'])}` (from `jobs/pipeline.yaml`), "
        f"every training row in each step, the best validation state kept (step 0 included); domain tags "
        f"from `{res['domain_artifact']}`.",
        "- **step 0**: the state tag-llm starts from: the function tag at its mean-embedding init and a ridge "
        "probe through the template (the *untrained function tag* ablation).",
        "- **ridge probe**: ridge on the last hidden state of the tag-free prompt, all training rows, λ by "
        "5-fold CV on a random permutation.",
        f"- **prompt-tuning+head**, **lora+head**: PEFT ({a['peft_epochs']} epochs of AdamW, batch "
        f"{a['peft_batch']}, lr {a['peft_lr']} (head lr/10), cosine, the best of {a['peft_evals']} validations "
        f"kept), heads started from the same ridge probe; run for {', '.join(a['peft_kinds'])} tasks.",
        "- **expert**: `tagray baseline`'s scikit-learn model best on the validation split (Morgan "
        "fingerprints / RDKit descriptors / protein composition); **train-mean**: the training mean "
        "(classification: the class prior).",
        "",
        "## Test metric (mean ± std over seeds)",
        "",
        "| method | " + " | ".join(f"{t} ({key[t]})" for t in tasks) + " | seconds per run | paper QED |",
        "|---|" + "---|" * len(tasks) + "---|---|",
    ]
    runs = S.get("runs", {})
    order = ["tag-llm", "step 0", "ridge probe", "prompt-tuning+head", "lora+head", "expert", "train-mean"]
    for method in [m for m in order if m in runs]:
        per = runs[method]
        secs = [per[t]["seconds"]["mean"] for t in tasks if t in per and "seconds" in per[t]]
        cells = [pm(per.get(t, {}).get(key[t])) for t in tasks]
        took = fmt(statistics.fmean(secs), 3) if secs and method not in ("step 0", "train-mean") else "-"
        L.append(
            f"| {method} | " + " | ".join(cells) + f" | {took} | {fmt(PAPER.get(method, {}).get('qed'))} |"
        )
    experts = {
        t: sorted({m.get("model") for m in res["runs"].get("expert", {}).get(t, {}).values()}) for t in tasks
    }
    L += [
        "",
        "Pearson r of the regression tasks (mean over seeds): "
        + "; ".join(
            f"{t}: "
            + ", ".join(
                f"{meth} {fmt(runs[meth][t]['pearson']['mean'], 3)}"
                for meth in ("tag-llm", "step 0", "ridge probe", "expert")
                if meth in runs and t in runs[meth] and "pearson" in runs[meth][t]
            )
            for t in tasks
            if kinds[t] == "regression"
        )  # fmt: skip
        + ".",
        "",
        "Expert models chosen on validation: "
        + "; ".join(f"{t}: {', '.join(map(str, v))}" for t, v in experts.items())
        + ". The paper's numbers (LLaMA-7B, its own data sizes) stand beside ours for the ordering, not the values.",
    ]
    tl, s0 = runs.get("tag-llm", {}), runs.get("step 0", {})
    lines = []
    for t in tasks:
        if t in tl and t in s0:
            a_, b_ = tl[t][key[t]], s0[t][key[t]]
            gap = abs(a_["mean"] - b_["mean"])
            noise = max(a_["std"], b_["std"])
            better = a_["mean"] < b_["mean"] if key[t] == "mse" else a_["mean"] > b_["mean"]
            verdict = (
                ("better" if better else "worse") + " than step 0 by more than the seeds' spread"
                if gap > noise and a_["n"] > 1
                else "within the seeds' spread of step 0"
            )
            lines.append(f"{t}: tag-llm {pm(a_)} vs step 0 {pm(b_)}, {verdict}")
    if lines:
        L += ["", "**Trained tag against its start** (a difference counts only beyond the seed spread): "
              + "; ".join(lines) + "."]  # fmt: skip
    abl = S.get("ablations", {})
    if abl:
        ab = a["ablation_tasks"]
        L += ["", "## Ablations (test MSE, mean ± std over seeds)", "", "| variant | " + " | ".join(ab) + " |",
              "|---|" + "---|" * len(ab)]  # fmt: skip
        L.append(
            "| full Tag-LLM | "
            + " | ".join(pm(runs.get("tag-llm", {}).get(t, {}).get("mse")) for t in ab)
            + " |"
        )
        L.append("| untrained function tag (= step 0) | "
                 + " | ".join(pm(runs.get("step 0", {}).get(t, {}).get("mse")) for t in ab) + " |")  # fmt: skip
        for variant, per in abl.items():
            L.append(f"| {variant} | " + " | ".join(pm(per.get(t, {}).get("mse")) for t in ab) + " |")
        L += ["", "Paper (drug combination MAE): full 12.21, without domain tags 12.39, without function tags "
              "21.14, without regression head 23.42."]  # fmt: skip
    sw = S.get("sweep", {})
    if sw:
        ab = a["ablation_tasks"]
        L += ["", "## Function-tag length (test MSE, mean ± std over seeds)", "", "| p | " + " | ".join(ab)
              + " | seconds per run |", "|---|" + "---|" * len(ab) + "---|"]  # fmt: skip
        for p in sorted(sw, key=int):
            secs = [sw[p][t]["seconds"]["mean"] for t in ab if t in sw[p] and "seconds" in sw[p][t]]
            L.append(f"| {p} | " + " | ".join(pm(sw[p].get(t, {}).get("mse")) for t in ab)
                     + f" | {fmt(statistics.fmean(secs), 3) if secs else '-'} |")  # fmt: skip
        L += ["", "Paper (DC, p in 1, 5, 10, 20, 50): p = 10 best, longer tags overfit."]
    if "translation" in res:
        L += ["", "## Translation: LM loss of the reference (test rows, lower is better)", "",
              f"Tags from `{res['translation_artifact']}`; the same frozen model and target tokens in every column.",
              "", "| set | pairs | rows | learned tags | untagged prompt | tag names as text |", "|---|---|---|---|---|---|"]  # fmt: skip
        for name, m in res["translation"].items():
            L.append(f"| {name} | {', '.join(m['pairs'])} | {m['n']} | {fmt(m['learned tags'])} | "
                     f"{fmt(m['untagged prompt'])} | {fmt(m['tag names as text'])} |")  # fmt: skip
    L += ["", f"Total {res['seconds'] / 60:.0f} min on {res['machine']['cpu_count']} CPU cores (load average at "
          f"start {res['machine']['loadavg_start'][0]:.1f})."]  # fmt: skip
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_options(ap, base="smollm2-135m", tasks=["qed", "logp", "descriptor", "amp"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="split seeds (split.seed)")
    ap.add_argument("--ablation-tasks", nargs="*", default=["qed"])
    ap.add_argument("--lengths", nargs="*", type=int, default=[1, 2, 5, 10, 20], help="function-tag lengths")
    ap.add_argument("--peft-kinds", nargs="*", default=["regression", "classification"],
                    help="task kinds that get the PEFT baselines")  # fmt: skip
    add_options(
        ap, train_rows=2000, valid_rows=200, test_rows=400, peft_epochs=3.0, peft_batch=16, peft_lr=1e-3,
        peft_evals=6, peft_seed=0, nohead_steps=120, nohead_lr=1e-3, domain_rows=1000, domain_steps=200,
        domain_lr=1.5e-2, translate_rows=120, threads=2, device="cpu",
    )  # fmt: skip
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override the shipped recipe, e.g. --set lr=3e-3")  # fmt: skip
    ap.add_argument(
        "--domain", default="runs/demo/domain", help="stage-1 artifact (default: train one if absent)"
    )
    ap.add_argument(
        "--cross", default="runs/demo/cross", help="stage-3 artifact for translation (skipped if absent)"
    )
    ap.add_argument("--work", default="runs/reproduce", help="where a stage-1 artifact is trained if needed")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/reproduce[_smoke].json)")
    ap.add_argument(
        "--doc", default=None, help="markdown path (default docs/reproduction.md; none with --smoke)"
    )
    ap.add_argument("--smoke", action="store_true", help="tiny random model and a few rows: code paths only")
    args = ap.parse_args(argv)
    args.recipe = shipped_recipe()
    for kv in args.set:
        k, _, v = kv.partition("=")
        args.recipe[k] = json.loads(v) if v[:1].isdigit() or v[:1] in "-[{" else v
    if args.smoke:
        args.recipe.update(epochs=2, eval_every=1)
        args = argparse.Namespace(
            **{
                **vars(args),
                "train_rows": 24,
                "tasks": [t for t in args.tasks if t in ("qed", "amp")] or args.tasks,
                "valid_rows": 8,
                "test_rows": 8,
                "lengths": [1, 3],
                "seeds": [1, 2],
                "peft_epochs": 1.0,
                "peft_evals": 1,
                "nohead_steps": 2,
                "domain_rows": 16,
                "domain_steps": 2,
                "translate_rows": 6,
                "domain": None,
                "work": args.work + "_smoke" if args.work == "runs/reproduce" else args.work,
            }  # fmt: skip
        )
    res = run(args)
    out = Path(args.out or RESULTS / ("reproduce_smoke.json" if args.smoke else "reproduce.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    command = "python bench/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = markdown(res, command.strip())
    print(md)
    doc = args.doc or (None if args.smoke else str(ROOT / "docs" / "reproduction.md"))
    if doc:
        Path(doc).write_text(md)
    print(f"results: {out}" + (f", {doc}" if doc else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
