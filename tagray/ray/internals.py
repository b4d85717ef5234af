"""Workarounds that touch Ray internals, quarantined here. Each was checked against Ray 2.60.0 (the pinned
version, pyproject.toml); re-check both on every Ray upgrade (tests/test_tune.py's slow tier exercises them).

- :func:`resumable_asha`: ASHA whose rung records survive ``Tuner.restore`` (reads and fills
  ``ASHAScheduler._brackets[0]._rungs``, private).
- :func:`reap_orphaned_placement_groups` / :func:`reaper`: removes the placement groups of ASHA-stopped
  trials (reads GCS placement-group records through ``ray._private.state``, private).
"""

from __future__ import annotations

import json
import logging
import time

import fsspec
import ray
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler

log = logging.getLogger("tagray")
REAP_EVERY_S = 5.0


class _ResumableASHA(ASHAScheduler):
    """See :func:`resumable_asha`. Ray 2.60: ``_brackets`` is a list of ``_Bracket`` (one, as brackets=1),
    each with ``_rungs = [(milestone, {trial_id: value}), ...]``; ``on_trial_add`` assigns the bracket."""

    def __init__(self, path: str, **kw):
        super().__init__(**kw)
        self._path = path
        self._loaded = False

    def on_trial_add(self, tune_controller, trial):
        fs, p = fsspec.core.url_to_fs(self._path)
        if not self._loaded and fs.exists(p):
            saved = json.loads(fs.cat_file(p))
            for milestone, rec in self._brackets[0]._rungs:
                rec.update(saved.get(str(milestone), {}))
        self._loaded = True
        super().on_trial_add(tune_controller, trial)

    def _save(self) -> None:
        fs, p = fsspec.core.url_to_fs(self._path)
        fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(p, "w") as f:
            json.dump({str(m): rec for m, rec in self._brackets[0]._rungs}, f)

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        super().on_trial_complete(tune_controller, trial, result)
        self._save()


def resumable_asha(path: str, **kw) -> ASHAScheduler:
    """ASHA (``ASHAScheduler(**kw)``) whose rung records survive ``Tuner.restore``.

    Why: Tune checkpoints the searcher but not the scheduler, so a resumed search would judge new trials
    against nobody (and stop none). The records (trial -> value per rung, a few bytes) are saved at
    ``path`` after every decision and reloaded when the first trial is added. ``path`` must lie outside
    the experiment folder, which Tune overwrites from its local copy.
    """
    return _ResumableASHA(path, **kw)


def reap_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creating actor died (returns how many).

    Why: ASHA stops a trial by killing its actor, and with it the Train controller that owns the workers'
    placement group. Ray keeps such a group until the job ends, and Train's own cleaner
    (``PlacementGroupCleaner``, Ray PR #58515) asks the State API, which needs the dashboard and fails
    when a machine runs several Ray instances: the stopped trial's CPUs / GPUs stayed reserved and later
    trials waited forever (seen: 15 min). Groups created by a driver (Tune's own) or by a detached actor
    are never touched. Ray 2.60: ``state._connect_and_get_accessor().get_placement_group_table()`` returns
    serialized ``gcs_pb2.PlacementGroupTableData`` records.
    """
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job, n = ray.get_runtime_context().get_job_id(), 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        by_actor = bool(pg.creator_actor_id) and not ray.ActorID(pg.creator_actor_id).is_nil()
        live = pg.state != gcs_pb2.PlacementGroupTableData.REMOVED
        mine = pg.creator_job_id.hex() == job and not pg.is_detached
        if live and by_actor and pg.creator_actor_dead and mine:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            n += 1
    return n


class _Reaper(Callback):
    def __init__(self):
        self.last = 0.0

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self.last > REAP_EVERY_S:
            self.last = time.monotonic()
            if n := reap_orphaned_placement_groups():
                log.info("tune: released %d placement group(s) of stopped trials", n)


def reaper() -> Callback:
    """A Tune callback running :func:`reap_orphaned_placement_groups` every :data:`REAP_EVERY_S` seconds."""
    return _Reaper()
