"""REST routes under ``/ai/``: pure request → (status, JSON) handlers, independent of Orthanc.

Authentication is Orthanc's own (``AuthenticationEnabled`` + ``RegisteredUsers``): a request reaches these
handlers only after Orthanc accepted its credentials. The user name is taken from the Basic header for the
audit trail.
"""

from __future__ import annotations

import base64
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from orthanc_plugin import jobs as J
from orthanc_plugin.events import Dispatcher, RequestError
from orthanc_plugin.rules import RuleError, parse_rules

_UID = r"[0-9.]{1,64}"
_ID = r"[0-9a-f]{32}"


@dataclass
class Request:
    method: str
    path: str  # after /ai/
    query: dict[str, str]
    body: bytes
    headers: dict[str, str]

    @property
    def user(self) -> str:
        auth = self.headers.get("authorization", "")
        if auth.lower().startswith("basic "):
            try:
                return base64.b64decode(auth[6:]).decode("utf-8", "replace").split(":", 1)[0]
            except ValueError:
                pass
        return "anonymous"

    def json(self) -> dict:
        if not self.body or not self.body.strip():
            return {}
        try:
            data = json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(f"the request body is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise RequestError("the request body must be a JSON object")
        return data


@dataclass(frozen=True)
class RawBody:
    """A non-JSON answer (CSV, Prometheus text, PNG…): a handler returns (status, RawBody(data, mime))."""

    data: bytes
    mime: str


Response = tuple[int, Any]


class Api:
    """All /ai/ routes. ``health`` and ``models`` are callables so they always show the live state."""

    def __init__(self, store: J.JobStore, dispatcher: Dispatcher, *, version: str,
                 health: Callable[[], dict], models: Callable[[], dict], reload_models: Callable[[], dict],
                 lease_seconds: float, worker_settings: dict | None = None,
                 claim_policy: Callable[[], dict] | None = None, destinations: list[str] | None = None) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.version = version
        self.health_info = health
        self.models = models
        self.reload_models = reload_models
        self.lease_seconds = lease_seconds
        self.worker_settings = worker_settings or {}
        self.claim_policy = claim_policy or (lambda: {"min_priority": None})
        self.destinations = destinations or []
        self._routes: list[tuple[str, re.Pattern, Callable[..., Response]]] = [
            ("GET", re.compile(r"health"), self.health),
            ("GET", re.compile(r"models"), self.list_models),
            ("POST", re.compile(r"models/reload"), self.post_reload),
            ("GET", re.compile(r"jobs"), self.list_jobs),
            ("GET", re.compile(rf"jobs/({_ID})"), self.get_job),
            ("GET", re.compile(rf"jobs/({_ID})/audit"), self.get_audit),
            ("POST", re.compile(rf"jobs/({_ID})/cancel"), self.cancel_job),
            ("POST", re.compile(rf"studies/({_UID})/segment"), self.segment_study),
            ("GET", re.compile(rf"studies/({_UID})/jobs"), self.study_jobs),
            ("DELETE", re.compile(rf"studies/({_UID})"), self.delete_study),
            ("POST", re.compile(r"rules/dry-run"), self.dry_run),
            ("GET", re.compile(r"rules"), self.list_rules),
            ("POST", re.compile(r"worker/claim"), self.claim),
            ("POST", re.compile(rf"jobs/({_ID})/heartbeat"), self.heartbeat),
            ("POST", re.compile(rf"jobs/({_ID})/complete"), self.complete),
            ("POST", re.compile(rf"jobs/({_ID})/fail"), self.fail),
        ]

    def add_routes(self, routes: list[tuple[str, str, Callable[..., Response]]]) -> None:
        """Let another module (follow-up, viewer, outbox…) serve routes under /ai/: (method, regex, handler);
        a handler takes the Request and the regex groups and returns (status, JSON body)."""
        self._routes.extend((method, re.compile(pattern), handler) for method, pattern, handler in routes)

    def handle(self, request: Request) -> Response:
        allowed = []
        for method, pattern, handler in self._routes:
            m = pattern.fullmatch(request.path.strip("/"))
            if not m:
                continue
            if method != request.method:
                allowed.append(method)
                continue
            try:
                return handler(request, *m.groups())
            except RequestError as exc:
                return exc.status, {"error": str(exc), **exc.payload}
            except J.JobError as exc:
                return exc.status, {"error": str(exc)}
        if allowed:
            return 405, {"error": f"method {request.method} not allowed here; use {', '.join(allowed)}"}
        return 404, {"error": f"no route /ai/{request.path}"}

    # -- public routes -----------------------------------------------------------------------------
    def view(self, job: dict) -> dict:
        return J.public_view(self.store, job)

    def health(self, request: Request) -> Response:
        return 200, {"status": "ok", "version": self.version, "time": time.time(), **self.health_info(),
                     "jobs": self.store.counts()}

    def list_models(self, request: Request) -> Response:
        return 200, {"models": [m.to_json() for m in self.models().values()]}

    def post_reload(self, request: Request) -> Response:
        return 200, self.reload_models()

    def list_jobs(self, request: Request) -> Response:
        try:
            limit = int(request.query.get("limit", "100"))
            offset = int(request.query.get("offset", "0"))
        except ValueError:
            raise RequestError("limit and offset must be integers") from None
        if not 1 <= limit <= 1000 or offset < 0:
            raise RequestError("limit must be 1..1000 and offset ≥ 0")
        jobs = self.store.list(state=request.query.get("state"), limit=limit, offset=offset,
                               study_instance_uid=request.query.get("study"))
        return 200, {"jobs": [self.view(j) for j in jobs], "counts": self.store.counts()}

    def get_job(self, request: Request, job_id: str) -> Response:
        return 200, self.view(self.store.get(job_id))

    def get_audit(self, request: Request, job_id: str) -> Response:
        self.store.get(job_id)
        return 200, {"audit": self.store.audit(job_id)}

    def cancel_job(self, request: Request, job_id: str) -> Response:
        return 200, self.view(self.store.cancel(job_id, actor=request.user))

    def segment_study(self, request: Request, study_uid: str) -> Response:
        body = request.json()
        model = body.get("model")
        force = body.get("force", False)
        if model is not None and not isinstance(model, str):
            raise RequestError('"model" must be a model id string')
        if not isinstance(force, bool):
            raise RequestError('"force" must be true or false')
        created = self.dispatcher.request_segmentation(study_uid, model_id=model, force=force, user=request.user)
        views = [self.view(j) for j in created]
        return 202, {**views[0], "jobs": views}

    def delete_study(self, request: Request, study_uid: str) -> Response:
        return 200, self.dispatcher.delete_study(study_uid, user=request.user)

    def study_jobs(self, request: Request, study_uid: str) -> Response:
        return 200, {"jobs": [self.view(j) for j in self.store.list(study_instance_uid=study_uid, limit=1000)]}

    def list_rules(self, request: Request) -> Response:
        return 200, {"rules": [{"name": r.name, "models": list(r.models), "priority": r.priority,
                                "destinations": list(r.destinations), "enabled": r.enabled}
                               for r in self.dispatcher.rules]}

    def dry_run(self, request: Request) -> Response:
        """Test rules (the body's, or the configured ones) against the studies already in Orthanc."""
        body = request.json()
        rules = None
        if "rules" in body:
            try:
                rules = tuple(parse_rules(body["rules"], destinations=self.destinations))
            except RuleError as exc:
                raise RequestError(f"invalid rules: {exc}") from None
        try:
            limit, offset = int(body.get("limit", 100)), int(body.get("offset", 0))
        except (TypeError, ValueError):
            raise RequestError("limit and offset must be integers") from None
        if not 1 <= limit <= 1000 or offset < 0:
            raise RequestError("limit must be 1..1000 and offset ≥ 0")
        return 200, self.dispatcher.dry_run(rules, limit=limit, offset=offset)

    # -- worker routes -------------------------------------------------------------------------
    def claim(self, request: Request) -> Response:
        body = request.json()
        worker = body.get("worker")
        if not isinstance(worker, str) or not worker:
            raise RequestError('"worker" (an id for the claiming worker) is required')
        models = self.models()
        wanted = body.get("models")
        if wanted is not None and not (isinstance(wanted, list) and all(isinstance(m, str) for m in wanted)):
            raise RequestError('"models" must be a list of model ids')
        wait = body.get("wait", 0)
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or wait < 0:
            raise RequestError('"wait" must be a number of seconds ≥ 0')
        # long poll, kept short: Orthanc waits for open requests when it stops, and its HTTP threads are few
        deadline = time.time() + min(float(wait), 2.0)
        while True:
            job = self.store.claim(worker, models=[m for m in (wanted or models) if m in models],
                                   min_priority=self.claim_policy()["min_priority"])
            remaining = deadline - time.time()
            if job is not None or remaining <= 0:
                break
            self.store.wait_for_queued(remaining)
        if job is None:
            return 204, None
        manifest = models[job["model_id"]]
        return 200, {"job": self.view(job), "lease": job["lease_token"], "lease_seconds": self.lease_seconds,
                     "model": manifest.to_json(), "settings": self.worker_settings}

    def _lease(self, body: dict) -> str:
        lease = body.get("lease")
        if not isinstance(lease, str) or not lease:
            raise RequestError('"lease" (the token returned by /ai/worker/claim) is required')
        return lease

    def heartbeat(self, request: Request, job_id: str) -> Response:
        body = request.json()
        progress = body.get("progress")
        if progress is not None and not isinstance(progress, (int, float)):
            raise RequestError('"progress" must be a number between 0 and 1')
        job = self.store.heartbeat(job_id, self._lease(body), progress=progress, message=body.get("message"))
        return 200, {"state": job["state"], "cancel": job["state"] == J.CANCELLED}

    def complete(self, request: Request, job_id: str) -> Response:
        body = request.json()
        outputs = body.get("outputs", [])
        if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
            raise RequestError('"outputs" must be a list of SOP Instance UIDs')
        timings = body.get("timings") or {}
        if not isinstance(timings, dict) or not all(isinstance(v, (int, float)) for v in timings.values()):
            raise RequestError('"timings" must map stage names to seconds')
        return 200, self.view(self.store.complete(job_id, self._lease(body), outputs,
                                                  actor=body.get("worker", "worker"), timings=timings))

    def fail(self, request: Request, job_id: str) -> Response:
        body = request.json()
        error = body.get("error")
        if not isinstance(error, str) or not error:
            raise RequestError('"error" (a sentence for the user) is required')
        lease = self._lease(body)
        if body.get("skipped"):
            return 200, self.view(self.store.skip(job_id, error, actor=body.get("worker", "worker"), lease_token=lease))
        return 200, self.view(self.store.fail(job_id, lease, error, retryable=bool(body.get("retryable")),
                                              actor=body.get("worker", "worker")))
