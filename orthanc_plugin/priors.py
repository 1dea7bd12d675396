"""Prior studies from the hospital PACS: C-FIND then C-MOVE through Orthanc's own modalities API.

Follow-up and comparison need a patient's earlier studies. ``PriorFetcher.retrieve`` asks a configured
DICOM modality (``"AI": {"Priors": {"Source": "pacs"}}``) for the patient's studies and moves those not yet
in Orthanc here, oldest first, as asynchronous Orthanc jobs; they then arrive like any study and are routed
by the rules. With ``"Auto": true`` this happens once per patient (per ``CooldownHours``) when a new study
of that patient becomes stable.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("orthanc_ai.priors")

STUDY_UID, STUDY_DATE, PATIENT_ID = "0020,000d", "0008,0020", "0010,0020"


class PriorsError(Exception):
    status = 400


@dataclass(frozen=True)
class PriorsSettings:
    source: str | None = None
    auto: bool = False
    max_studies: int = 10
    cooldown_hours: float = 24.0


def _tag(answer: dict, key: str, name: str) -> str:
    """Orthanc answers come as {"0020,000d": {"Value": …}} or simplified {"StudyInstanceUID": …}."""
    value = answer.get(key, answer.get(name, ""))
    if isinstance(value, dict):
        value = value.get("Value", "")
    return str(value or "")


class PriorFetcher:
    def __init__(self, settings: PriorsSettings, post: Callable[[str, str], bytes], get: Callable[[str], bytes],
                 lookup_study: Callable[[str], str | None], own_aet: str,
                 remember: Callable[[str, str], None], recall: Callable[[str], str | None]) -> None:
        self.settings = settings
        self.post, self.get = post, get
        self.lookup_study = lookup_study
        self.own_aet = own_aet
        self.remember, self.recall = remember, recall

    def find(self, source: str, patient_id: str) -> tuple[str, list[dict]]:
        """C-FIND at study level: (query id, [{"index", "study_instance_uid", "study_date"}]) oldest first."""
        body = json.dumps({"Level": "Study", "Query": {"PatientID": patient_id, "StudyInstanceUID": "",
                                                       "StudyDate": "", "ModalitiesInStudy": ""}})
        try:
            query = json.loads(self.post(f"/modalities/{source}/query", body))
            answers = json.loads(self.get(f"/queries/{query['ID']}/answers?expand"))
        except Exception as exc:
            raise PriorsError(f"C-FIND to '{source}' failed: {exc}") from None
        studies = [{"index": i, "study_instance_uid": _tag(a, STUDY_UID, "StudyInstanceUID"),
                    "study_date": _tag(a, STUDY_DATE, "StudyDate")} for i, a in enumerate(answers)]
        studies = [s for s in studies if s["study_instance_uid"]]
        return query["ID"], sorted(studies, key=lambda s: s["study_date"] or "99999999")

    def retrieve(self, patient_id: str, *, source: str | None = None) -> dict:
        source = source or self.settings.source
        if not source:
            raise PriorsError('no PACS to query: set "AI": {"Priors": {"Source": "<DicomModalities name>"}} '
                              'or pass {"source": ...}')
        query_id, studies = self.find(source, patient_id)
        missing = [s for s in studies if not self.lookup_study(s["study_instance_uid"])]
        moved, errors = [], []
        for study in missing[: self.settings.max_studies]:
            body = json.dumps({"TargetAet": self.own_aet, "Synchronous": False})
            try:
                job = json.loads(self.post(f"/queries/{query_id}/answers/{study['index']}/retrieve", body))
                moved.append({**study, "orthanc_job": job.get("ID")})
            except Exception as exc:
                errors.append(f"C-MOVE of {study['study_instance_uid']} failed: {exc}")
        self.remember(f"priors:{patient_id}", str(time.time()))
        log.info("priors of a patient: %d at %s, %d already here, %d being moved, %d errors",
                 len(studies), source, len(studies) - len(missing), len(moved), len(errors))
        return {"source": source, "found": len(studies), "already_here": len(studies) - len(missing),
                "retrieving": moved, "errors": errors}

    def on_new_study(self, patient_id: str) -> None:
        """Automatic mode: fetch a patient's priors at most once per cooldown (in a thread of its own)."""
        if not (self.settings.auto and self.settings.source and patient_id):
            return
        last = self.recall(f"priors:{patient_id}")
        if last and time.time() - float(last) < self.settings.cooldown_hours * 3600:
            return
        self.remember(f"priors:{patient_id}", str(time.time()))  # claim it before the slow C-FIND

        def run() -> None:
            try:
                self.retrieve(patient_id)
            except Exception as exc:
                log.warning("automatic prior retrieval failed: %s", exc)
        threading.Thread(target=run, name="ai-priors", daemon=True).start()

    def routes(self) -> list[tuple[str, str, Callable]]:
        from orthanc_plugin.events import RequestError

        def retrieve(request, patient_id):
            body = request.json()
            source = body.get("source")
            if source is not None and not isinstance(source, str):
                raise RequestError('"source" must be the name of a DICOM modality')
            try:
                return 202, self.retrieve(patient_id, source=source)
            except PriorsError as exc:
                raise RequestError(str(exc)) from None
        return [("POST", r"patients/([^/]+)/retrieve-priors", retrieve)]
