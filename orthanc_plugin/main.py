"""Entry point loaded by Orthanc's Python plugin (``"PythonScript"``): wiring only.

Runs inside Orthanc's embedded Debian Python 3.11, so it first puts the repository and the venv's
site-packages on ``sys.path``. It stays light: no torch, no numpy; heavy work happens in the worker.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
_VENV = Path(os.environ.get("ORTHANC_AI_VENV", _REPO / ".venv"))
_here = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]  # our modules are a package
sys.path.insert(0, str(_REPO))
for site in sorted(glob.glob(str(_VENV / "lib" / "python3*" / "site-packages"))):
    if site not in sys.path:
        sys.path.append(site)

import orthanc  # noqa: E402  (provided by the Python plugin)

from inference import __version__  # noqa: E402
from inference.models.manifest import BUILTIN_MODELS_DIR, ManifestError, load_manifests  # noqa: E402
from orthanc_plugin.config import ConfigError, orthanc_url, parse_config, service_credentials  # noqa: E402
from orthanc_plugin.events import Dispatcher  # noqa: E402
from orthanc_plugin.jobs import JobStore  # noqa: E402
from orthanc_plugin import metrics  # noqa: E402
from orthanc_plugin.backpressure import ClaimPolicy, parse_hours  # noqa: E402
from orthanc_plugin.outbox import Backoff, Outbox  # noqa: E402
from orthanc_plugin.priors import PriorFetcher  # noqa: E402
from orthanc_plugin.routes import Api, RawBody, Request  # noqa: E402
from orthanc_plugin.supervisor import Supervisor  # noqa: E402

log = logging.getLogger("orthanc_ai")


class _OrthancLogHandler(logging.Handler):
    """Send our log records to Orthanc's log, at the matching level."""

    def emit(self, record: logging.LogRecord) -> None:
        msg = "[ai] " + self.format(record)
        if record.levelno >= logging.ERROR:
            orthanc.LogError(msg)
        elif record.levelno >= logging.WARNING:
            orthanc.LogWarning(msg)
        else:
            orthanc.LogInfo(msg)


class _RestReader:
    """Orthanc's REST API from inside the plugin (used from our threads and REST callbacks only)."""

    def get_json(self, uri: str) -> object:
        return json.loads(orthanc.RestApiGet(uri))

    def get_text(self, uri: str) -> str:
        data = orthanc.RestApiGet(uri)
        return data.decode() if isinstance(data, bytes) else str(data)

    def lookup_study(self, study_instance_uid: str) -> str | None:
        try:
            found = orthanc.LookupStudy(study_instance_uid)
        except Exception:
            return None
        return found or None

    def delete_study(self, orthanc_study_id: str) -> None:
        orthanc.RestApiDelete(f"/studies/{orthanc_study_id}")


def _forward(destination, resources: list[str]) -> None:
    """Send Orthanc instances to a destination through Orthanc itself (raises on failure)."""
    body = json.dumps({"Resources": resources, "Synchronous": True})
    if destination.type == "dicom":
        orthanc.RestApiPost(f"/modalities/{destination.target}/store", body)
    elif destination.type == "peer":
        orthanc.RestApiPost(f"/peers/{destination.target}/store", body)
    else:  # a route of the DICOMweb plugin: only reachable "after plugins"
        orthanc.RestApiPostAfterPlugins(f"/dicom-web/servers/{destination.target}/stow", body)


def _resolve_instances(sop_instance_uids: list[str]) -> list[str]:
    ids = []
    for uid in sop_instance_uids:
        hits = json.loads(orthanc.RestApiPost("/tools/lookup", uid))
        ids += [h["ID"] for h in hits if h.get("Type") == "Instance"]
    return ids


def _send(output, status: int, body: object) -> None:
    if isinstance(body, RawBody) and status == 200:
        output.AnswerBuffer(body.data, body.mime)
        return
    if status == 200:
        output.AnswerBuffer(json.dumps(body), "application/json")
    elif body is None:
        output.SendHttpStatusCode(status)
    elif status == 405:
        output.SendMethodNotAllowed("GET,POST")
    else:
        text = json.dumps(body)
        output.SetHttpHeader("Content-Type", "application/json")
        try:  # plugin 4.0 takes (status, str, size); later versions take (status, bytes)
            output.SendHttpStatus(status, text, len(text.encode()))
        except TypeError:
            output.SendHttpStatus(status, text.encode())


def _setup() -> None:
    handler = _OrthancLogHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    full = json.loads(orthanc.GetConfiguration())
    try:
        cfg = parse_config(full)
    except ConfigError as exc:
        orthanc.LogError(f"[ai] configuration error: {exc}")
        raise SystemExit(f"orthanc-ai: configuration error: {exc}") from None
    if not cfg.enabled:
        log.warning('"AI.Enabled" is false: the AI extension is not active')
        return
    cfg.data_directory.mkdir(parents=True, exist_ok=True)
    cfg.log_directory.mkdir(parents=True, exist_ok=True)

    state: dict = {}

    def load_models() -> dict:
        manifests = load_manifests([BUILTIN_MODELS_DIR, *cfg.models_directories], approved=cfg.approved_models)
        state["models"] = {m.id: m for m in manifests}
        return state["models"]

    try:
        load_models()
    except ManifestError as exc:
        orthanc.LogError(f"[ai] model manifest error: {exc}")
        raise SystemExit(f"orthanc-ai: model manifest error: {exc}") from None

    def reload_models() -> dict:
        try:
            models = load_models()
        except ManifestError as exc:
            from orthanc_plugin.events import RequestError
            raise RequestError(f"models not reloaded: {exc}", status=400) from None
        return {"models": [m.to_json() for m in models.values()]}

    def on_transition(job: dict, old: str, new: str, actor: str) -> None:
        log.info("job %s (%s) %s → %s by %s%s", job["id"], job["model_id"], old, new, actor,
                 f": {job['error']}" if new in ("failed", "skipped") and job.get("error") else "")
        if new == "done" and "outbox" in state:
            state["outbox"].enqueue_job(job)
        if new in ("done", "failed", "skipped", "cancelled") and "followup" in state:
            state["followup"].job_finished(job)  # a report written before its prior was measured is redone

    store = JobStore(cfg.job_store_path, max_attempts=cfg.max_attempts, lease_seconds=cfg.lease_seconds,
                     on_transition=on_transition)
    dispatcher = Dispatcher(store, _RestReader(), cfg.rules, lambda: state["models"])
    supervisor = Supervisor(store=store, python=cfg.worker_python, orthanc_url=orthanc_url(full),
                            credentials=service_credentials(full), count=cfg.worker_count,
                            log_directory=cfg.log_directory, repo_root=_REPO, threads=cfg.worker_threads,
                            reaper_interval=cfg.reaper_interval_seconds,
                            models_directories=cfg.models_directories,
                            max_backoff=cfg.worker_restart_max_backoff_seconds)
    echo_cache: dict[str, tuple[float, dict]] = {}

    def destinations_health() -> dict:
        """C-ECHO each DICOM destination (cached 30 s); peers and DICOMweb servers are reported as declared."""
        out = {}
        for name, dest in cfg.destinations.items():
            if dest.type != "dicom":
                out[name] = {**dest.to_json(), "echo": None}
                continue
            cached = echo_cache.get(name)
            if cached is None or time.time() - cached[0] > 30:
                try:
                    orthanc.RestApiPost(f"/modalities/{dest.target}/echo", json.dumps({"Timeout": 3}))
                    result = {**dest.to_json(), "echo": "ok"}
                except Exception as exc:
                    result = {**dest.to_json(), "echo": f"failed: {exc}"}
                echo_cache[name] = cached = (time.time(), result)
            out[name] = cached[1]
        return out

    policy = ClaimPolicy(Path(full.get("StorageDirectory", "OrthancStorage")).resolve(),
                         cfg.min_free_disk_percent, cfg.max_queue_length,
                         parse_hours(cfg.off_peak_hours) if cfg.off_peak_hours else None)

    def claim_policy() -> dict:
        return policy.state(store.counts()["queued"])

    def health() -> dict:
        info = supervisor.describe()
        info["backpressure"] = claim_policy()
        if "outbox" in state:
            info["outbox"] = state["outbox"].counts()
        info["destinations"] = destinations_health()
        return info

    api = Api(store, dispatcher, version=__version__, health=health,
              models=lambda: state["models"], reload_models=reload_models, lease_seconds=cfg.lease_seconds,
              claim_policy=claim_policy, destinations=list(cfg.destinations),
              worker_settings={"report_language": cfg.report_language,
                               "report_template_directory": str(cfg.report_template_directory or "") or None})

    def on_change(change_type, level, resource_id) -> None:
        if change_type == orthanc.ChangeType.STABLE_STUDY:
            if cfg.auto_trigger:
                dispatcher.notify_stable_study(resource_id)
        elif change_type == orthanc.ChangeType.ORTHANC_STARTED:
            outbox.start()
            dispatcher.start()
            supervisor.start()
            threading.Thread(target=replay, name="ai-replay", daemon=True).start()
        elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
            outbox.stop()
            dispatcher.stop()
            supervisor.stop()

    def replay() -> None:
        """Studies that arrived while we were down, or were not yet stable when Orthanc stopped."""
        try:
            stored = store.setting("last_change_seq")
            if stored is None:  # first start: studies already in Orthanc are not ours to process unasked
                store.set_setting("last_change_seq", str(_RestReader().get_json("/changes?last")["Last"]))
                return
            count, last = dispatcher.replay_changes(int(stored))
            store.set_setting("last_change_seq", str(last))
            if count:
                log.warning("re-routing %d stud(y/ies) changed since the last start (idempotent)", count)
        except Exception:
            log.exception("could not replay Orthanc's changes")

    def on_rest(output, uri, **request) -> None:
        req = Request(method=request["method"], path=request["groups"][0], query=request.get("get") or {},
                      body=request.get("body") or b"", headers=request.get("headers") or {})
        try:
            status, body = api.handle(req)
        except Exception as exc:  # never leak a traceback to the client
            log.exception("route /ai/%s failed", req.path)
            status, body = 500, {"error": f"internal error: {type(exc).__name__}"}
        _send(output, status, body)

    # --- feature modules: each adds its routes/callbacks here (keep to a few lines each) ---
    from orthanc_plugin import viewer  # the OHIF viewer at /ohif/ (installed by `make viewer`)
    viewer.register(orthanc, api, _REPO / "build" / "ohif")
    dicomweb_enabled = (full.get("DicomWeb") or {}).get("Enable", True)
    if cfg.annotation_metadata and dicomweb_enabled:  # WADO-RS series metadata with annotations' coordinates intact
        from orthanc_plugin import dicomweb_metadata
        dicomweb_metadata.register(orthanc, full.get("DicomWeb") or {})
    outbox = state["outbox"] = Outbox(store, cfg.destinations, _forward, _resolve_instances, Backoff(
        cfg.outbox_initial_backoff_seconds, cfg.outbox_max_backoff_seconds, cfg.outbox_max_age_seconds))
    api.add_routes(outbox.routes())
    api.add_routes(metrics.routes(store, health))
    priors = PriorFetcher(cfg.priors, orthanc.RestApiPost, orthanc.RestApiGet, _RestReader().lookup_study,
                          full.get("DicomAet", "ORTHANC"), store.set_setting, store.setting)
    dispatcher.study_hooks.append(lambda study: priors.on_new_study(study.get("PatientMainDicomTags", {}).get("PatientID", "")))
    api.add_routes(priors.routes())

    from orthanc_plugin import followup  # lesions across a patient's studies, from every TID 1500 SR
    follow_up = followup.register(orthanc, api, cfg.data_directory / "ai-followup.sqlite", dispatcher=dispatcher,
                                  jobs=store, auto_priors=cfg.auto_trigger)
    state["followup"] = follow_up
    if cfg.auto_trigger:  # priors first: queued (at manual priority) before the new study's own job exists
        dispatcher.study_hooks.append(lambda study: follow_up.queue_priors(study["ID"]))
    on_change = follow_up.chain(on_change)

    from orthanc_plugin import slides  # whole-slide pathology: /ai/slides, inbox folder, DICOM WSI series
    slide_service = slides.register(orthanc, api, cfg.job_store_path, cfg.data_directory, full.get("AI", {}).get(
        "Pathology"), lease_seconds=cfg.lease_seconds, max_attempts=cfg.max_attempts)
    on_change = slide_service.chain(on_change)
    supervisor.slide_worker = slide_service.config.enabled  # slides never hold up the radiology queue

    orthanc.RegisterOnChangeCallback(on_change)
    orthanc.RegisterRestCallback("/ai/(.*)", on_rest)
    log.warning("AI extension %s ready: %d model(s), %d rule(s), %d local worker(s), job store %s",
                __version__, len(state["models"]), len(cfg.rules), cfg.worker_count, cfg.job_store_path)


_setup()
