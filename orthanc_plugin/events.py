"""From Orthanc events and user requests to jobs.

Orthanc callbacks only put a study id on a queue (:meth:`Dispatcher.notify_stable_study`); a thread of
ours reads the study over the REST API, applies the routing rules and creates jobs. The same code serves
``POST /ai/studies/{uid}/segment``.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from orthanc_plugin import jobs as J
from orthanc_plugin.rules import MANUAL_PRIORITY, Rule, is_own_output, matching_rules

log = logging.getLogger("orthanc_ai.events")


ChangeCallback = Callable[[Any, Any, str], None]


def chain_changes(first: ChangeCallback, then: ChangeCallback) -> ChangeCallback:
    """One on-change callback that calls ``first`` and then ``then`` (Orthanc takes a single change callback,
    and the follow-up and slides each add theirs to the dispatcher's)."""
    def on_change(change_type: Any, level: Any, resource_id: str) -> None:
        first(change_type, level, resource_id)
        then(change_type, level, resource_id)
    return on_change


class OrthancReader(Protocol):
    """The part of Orthanc's REST API the dispatcher reads (a fake one serves the unit tests)."""

    def get_json(self, uri: str) -> object: ...

    def get_text(self, uri: str) -> str: ...

    def lookup_study(self, study_instance_uid: str) -> str | None: ...

    def delete_study(self, orthanc_study_id: str) -> None: ...


class RequestError(Exception):
    status = 400

    def __init__(self, message: str, *, status: int = 400, payload: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.payload = payload or {}


@dataclass(frozen=True)
class SeriesInfo:
    orthanc_id: str
    tags: Mapping[str, str]  # Modality, SeriesDescription, SeriesInstanceUID, Manufacturer, SOPClassUID
    instance_count: int

    @property
    def fingerprint(self) -> str:
        return f"instances={self.instance_count}"


def channel_inputs(manifest: object) -> list[dict]:
    """The input channels a model declares (``params.inputs``); one entry for single-series models."""
    inputs = (getattr(manifest, "params", None) or {}).get("inputs") or []
    return [c for c in inputs if isinstance(c, dict)]


def match_channels(manifest: object, series_list: list[SeriesInfo]) -> tuple[dict[str, SeriesInfo], list[str]]:
    """For each declared channel, the first unused series of the study that fits it: its ``Modality``
    (default the model's) and ``SeriesDescription`` regular expression. Returns (chosen, missing)."""
    chosen: dict[str, SeriesInfo] = {}
    missing = []
    for index, channel in enumerate(channel_inputs(manifest)):
        name = str(channel.get("name") or f"channel {index}")
        modality = str(channel.get("Modality") or channel.get("modality") or getattr(manifest, "modality", "")).upper()
        pattern = channel.get("SeriesDescription")
        fits = [s for s in series_list
                if not is_own_output(s.tags) and s not in chosen.values()
                and (not modality or str(s.tags.get("Modality", "")).upper() == modality)
                and (not pattern or re.search(pattern, s.tags.get("SeriesDescription", ""), re.I))]
        if fits:
            chosen[name] = fits[0]
        else:
            missing.append(f"{name} (series description matching '{pattern}')" if pattern else name)
    return chosen, missing


class Dispatcher:
    """Turns stable studies and user requests into queued jobs."""

    def __init__(self, store: J.JobStore, orthanc: OrthancReader, rules: tuple[Rule, ...],
                 models: Callable[[], Mapping[str, object]]) -> None:
        self.store = store
        self.orthanc = orthanc
        self.rules = rules
        self.models = models  # id -> manifest (with .id, .version, .modality)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.study_hooks: list[Callable[[dict], None]] = []  # called with each stable study's JSON

    # -- callback side: enqueue only ---------------------------------------------------------
    def notify_stable_study(self, orthanc_study_id: str) -> None:
        self._queue.put(orthanc_study_id)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ai-dispatcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            study_id = self._queue.get()
            if study_id is None:
                return
            try:
                created = self.on_stable_study(study_id)
                if created:
                    log.info("study %s: %d job(s) queued", study_id, len(created))
            except Exception:  # a bad study must not stop the dispatcher
                log.exception("could not route stable study %s", study_id)

    def replay_changes(self, since: int) -> tuple[int, int]:
        """Re-route the studies Orthanc changed since change ``since`` (a restart loses STABLE_STUDY events of
        studies that were still arriving). Routing is idempotent, so replaying twice creates nothing twice.
        Returns (studies queued for routing, last change seen)."""
        studies: list[str] = []
        last = since
        while True:
            page = self.orthanc.get_json(f"/changes?since={last}&limit=1000")
            for change in page.get("Changes", []):
                kind, resource = change.get("ChangeType"), change.get("ID")
                study = None
                if kind in ("NewStudy", "StableStudy"):
                    study = resource
                elif kind == "NewSeries":
                    try:
                        study = self.orthanc.get_json(f"/series/{resource}").get("ParentStudy")
                    except Exception:  # deleted since
                        study = None
                if study and study not in studies:
                    studies.append(study)
            last = int(page.get("Last", last))
            if page.get("Done", True) or not page.get("Changes"):
                break
        for study in studies:
            self.notify_stable_study(study)
        return len(studies), last

    # -- work ----------------------------------------------------------------------------------
    def study_series(self, orthanc_study_id: str) -> list[SeriesInfo]:
        out = []
        for s in self.orthanc.get_json(f"/studies/{orthanc_study_id}/series"):
            tags = dict(s.get("MainDicomTags", {}))
            instances = s.get("Instances", [])
            tags["NumberOfInstances"] = str(len(instances))
            if instances:
                for key, metadata in (("SOPClassUID", "SopClassUid"), ("RemoteAET", "RemoteAET")):
                    try:
                        tags[key] = self.orthanc.get_text(f"/instances/{instances[0]}/metadata/{metadata}")
                    except Exception:  # absent for instances uploaded over REST
                        tags.setdefault(key, "")
            out.append(SeriesInfo(s["ID"], tags, len(instances)))
        return out

    def on_stable_study(self, orthanc_study_id: str) -> list[dict]:
        """Route every series of a stable study; create jobs that do not exist yet."""
        try:
            study = self.orthanc.get_json(f"/studies/{orthanc_study_id}")
        except Exception:
            log.info("study %s is gone; nothing to route", orthanc_study_id)
            return []
        for hook in self.study_hooks:
            try:
                hook(study)
            except Exception:
                log.exception("study hook failed")
        study_uid = study["MainDicomTags"]["StudyInstanceUID"]
        models = self.models()
        created = []
        series_list = self.study_series(orthanc_study_id)
        multi_done: set[str] = set()
        for series in series_list:
            for model_id, priority, destinations in self.plan(series.tags):
                manifest = models.get(model_id)
                if manifest is None:
                    log.warning("rule names model '%s', which is not installed; series skipped", model_id)
                    continue
                if len(channel_inputs(manifest)) > 1:  # one job per study, with one series per channel
                    if model_id not in multi_done:
                        multi_done.add(model_id)
                        job = self._multi_input_job(study_uid, orthanc_study_id, series_list, series, manifest,
                                                    "auto", "system", priority, destinations, force=False)
                        if job:
                            created.append(job)
                    continue
                with self.store.lock:  # the follow-up may queue this same study from its own thread
                    existing = self.store.find(series_instance_uid=series.tags.get("SeriesInstanceUID", ""),
                                               model_id=manifest.id, model_version=manifest.version,
                                               input_fingerprint=series.fingerprint)
                    if existing:  # already processed (or in progress): STABLE_STUDY fires again after our results
                        continue
                    created.append(self._create(study_uid, orthanc_study_id, series, manifest, "auto", "system",
                                                priority=priority, destinations=destinations))
        return created

    def dry_run(self, rules: tuple[Rule, ...] | None = None, *, limit: int = 100, offset: int = 0) -> dict:
        """Which studies already in Orthanc the rules would send to which model (nothing is queued)."""
        saved = self.rules
        if rules is not None:
            self.rules = rules
        try:
            studies = self.orthanc.get_json(f"/studies?limit={limit}&since={offset}")
            out = []
            for orthanc_id in studies:
                study = self.orthanc.get_json(f"/studies/{orthanc_id}")
                series_out = []
                for series in self.study_series(orthanc_id):
                    for model_id, priority, destinations in self.plan(series.tags):
                        series_out.append({"series_instance_uid": series.tags.get("SeriesInstanceUID"),
                                           "modality": series.tags.get("Modality"),
                                           "series_description": series.tags.get("SeriesDescription", ""),
                                           "model": model_id, "priority": priority,
                                           "destinations": list(destinations),
                                           "model_installed": model_id in self.models()})
                out.append({"study_instance_uid": study["MainDicomTags"].get("StudyInstanceUID"),
                            "orthanc_id": orthanc_id, "matches": series_out})
        finally:
            self.rules = saved
        return {"studies": out, "matched_studies": sum(1 for s in out if s["matches"]),
                "limit": limit, "offset": offset}

    def plan(self, tags: Mapping[str, str]) -> list[tuple[str, int, tuple[str, ...]]]:
        """(model id, job priority, destinations) for a series: the highest priority of the rules naming a
        model wins, and their destinations are merged."""
        plan: dict[str, tuple[int, list[str]]] = {}
        for rule in matching_rules(self.rules, tags):
            for model_id in rule.models:
                priority, dests = plan.get(model_id, (rule.job_priority, []))
                dests.extend(d for d in rule.destinations if d not in dests)
                plan[model_id] = (max(priority, rule.job_priority), dests)
        return [(m, p, tuple(d)) for m, (p, d) in plan.items()]

    def request_segmentation(self, study_instance_uid: str, *, model_id: str | None, force: bool,
                             user: str) -> list[dict]:
        """``POST /ai/studies/{uid}/segment``: queue jobs by hand; 409 when done already and not forced."""
        orthanc_study_id = self.orthanc.lookup_study(study_instance_uid)
        if orthanc_study_id is None:
            raise RequestError(f"no study with StudyInstanceUID {study_instance_uid} in Orthanc", status=404)
        models = self.models()
        if model_id is not None and model_id not in models:
            raise RequestError(f"unknown model '{model_id}'; installed: {', '.join(sorted(models)) or 'none'}")
        series_list = self.study_series(orthanc_study_id)
        pairs: list[tuple[SeriesInfo, object, tuple[str, ...]]] = []
        for series in series_list:
            for routed, _, destinations in self.plan(series.tags):
                if routed in models and model_id in (None, routed):
                    pairs.append((series, models[routed], destinations))
        if model_id is not None and not pairs:  # no rule for it: any input series of the model's modality
            manifest = models[model_id]
            pairs = [(s, manifest, ()) for s in series_list
                     if not is_own_output(s.tags) and s.tags.get("Modality", "").upper() == manifest.modality.upper()]
        if not pairs:
            what = f"model '{model_id}'" if model_id else "any routing rule"
            raise RequestError(f"no series of study {study_instance_uid} matches {what}")

        created, conflicts = [], []
        multi = [(s, m, d) for s, m, d in pairs if len(channel_inputs(m)) > 1]
        pairs = [(s, m, d) for s, m, d in pairs if len(channel_inputs(m)) <= 1]
        for model in {m.id: m for _, m, _ in multi}.values():
            anchor, _, destinations = next(p for p in multi if p[1].id == model.id)
            job = self._multi_input_job(study_instance_uid, orthanc_study_id, series_list, anchor, model, "manual",
                                        user, MANUAL_PRIORITY, destinations, force=force)
            if job is None:
                conflicts.extend(self.store.find(series_instance_uid=anchor.tags.get("SeriesInstanceUID", ""),
                                                 model_id=model.id, model_version=model.version,
                                                 states=J.ACTIVE | {J.DONE}))
            else:
                created.append(job)
        for series, manifest, destinations in pairs:
            with self.store.lock:  # check and create in one step (routing may run in another thread)
                existing = self.store.find(series_instance_uid=series.tags.get("SeriesInstanceUID", ""),
                                           model_id=manifest.id, model_version=manifest.version,
                                           states=J.ACTIVE | {J.DONE})
                if existing and not force:
                    conflicts.extend(existing)
                    continue
                for job in existing:
                    if job["state"] in J.ACTIVE:
                        self.store.cancel(job["id"], actor=user, reason="superseded by a forced re-run")
                created.append(self._create(study_instance_uid, orthanc_study_id, series, manifest, "manual", user,
                                            priority=MANUAL_PRIORITY, destinations=destinations))
        if not created:
            raise RequestError("this study was already processed by this model; send {\"force\": true} to re-run",
                               status=409, payload={"jobs": [j["id"] for j in conflicts]})
        return created

    def delete_study(self, study_instance_uid: str, *, user: str) -> dict:
        """``DELETE /ai/studies/{uid}``: cancel the study's active jobs, audit who deleted it, delete it."""
        orthanc_study_id = self.orthanc.lookup_study(study_instance_uid)
        if orthanc_study_id is None:
            raise RequestError(f"no study with StudyInstanceUID {study_instance_uid} in Orthanc", status=404)
        cancelled = []
        for job in self.store.list(study_instance_uid=study_instance_uid, limit=1000):
            if job["state"] in J.ACTIVE:
                cancelled.append(self.store.cancel(job["id"], actor=user, reason="the study was deleted")["id"])
        self.store.audit_event("study-deleted", study_instance_uid=study_instance_uid, actor=user,
                               detail=f"cancelled jobs: {', '.join(cancelled) or 'none'}")
        self.orthanc.delete_study(orthanc_study_id)
        return {"deleted": study_instance_uid, "cancelled_jobs": cancelled}

    def _multi_input_job(self, study_uid: str, orthanc_study_id: str, series_list: list[SeriesInfo],
                         anchor: SeriesInfo, manifest: object, trigger: str, actor: str, priority: int,
                         destinations: tuple[str, ...], *, force: bool) -> dict | None:
        """A multi-sequence model (BraTS-style T1, T1c, T2, FLAIR…): one job with a series per channel, or a
        job skipped with the missing sequences named. None when that exact input was processed already."""
        with self.store.lock:  # check and create in one step
            return self._multi_input_job_locked(study_uid, orthanc_study_id, series_list, anchor, manifest, trigger,
                                                actor, priority, destinations, force=force)

    def _multi_input_job_locked(self, study_uid: str, orthanc_study_id: str, series_list: list[SeriesInfo],
                                anchor: SeriesInfo, manifest: object, trigger: str, actor: str, priority: int,
                                destinations: tuple[str, ...], *, force: bool) -> dict | None:
        chosen, missing = match_channels(manifest, series_list)
        first = next(iter(chosen.values()), anchor)
        fingerprint = ";".join(f"{name}={s.orthanc_id}:{s.instance_count}" for name, s in chosen.items())
        existing = self.store.find(series_instance_uid=first.tags.get("SeriesInstanceUID", ""), model_id=manifest.id,
                                   model_version=manifest.version, input_fingerprint=fingerprint,
                                   states=None if not force else J.ACTIVE)
        if existing and not force:
            return None
        for job in existing:
            self.store.cancel(job["id"], actor=actor, reason="superseded by a forced re-run")
        job = self._create(study_uid, orthanc_study_id, first, manifest, trigger, actor, priority=priority,
                           destinations=destinations, fingerprint=fingerprint,
                           inputs=tuple((name, s.orthanc_id) for name, s in chosen.items()), hold=bool(missing))
        if missing:
            needed = ", ".join(str(c.get("name") or "?") for c in channel_inputs(manifest))
            return self.store.skip(job["id"], f"this study lacks the sequence(s) {'; '.join(missing)}; "
                                              f"{manifest.id} needs {needed}", actor=actor)
        return job

    def _create(self, study_uid: str, orthanc_study_id: str, series: SeriesInfo, manifest: object,
                trigger: str, actor: str, *, priority: int = 0, destinations: tuple[str, ...] = (),
                fingerprint: str | None = None, inputs: tuple[tuple[str, str], ...] = (),
                hold: bool = False) -> dict:
        job = self.store.create(J.NewJob(
            study_instance_uid=study_uid, orthanc_study_id=orthanc_study_id,
            series_instance_uid=series.tags.get("SeriesInstanceUID", ""), orthanc_series_id=series.orthanc_id,
            model_id=manifest.id, model_version=manifest.version,
            input_fingerprint=series.fingerprint if fingerprint is None else fingerprint,
            trigger=trigger, priority=priority, destinations=destinations, inputs=inputs), actor=actor)
        if hold:
            return job  # stays pending: the caller skips it, naming the missing sequences
        if getattr(manifest, "status", "available") != "available":
            return self.store.reject(job["id"], f"model '{manifest.id}' is unavailable: {manifest.reason}", actor=actor)
        return self.store.enqueue(job["id"], actor=actor)
