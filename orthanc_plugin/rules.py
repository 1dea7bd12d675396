"""Routing rules: which series of a stable study go to which model.

A rule matches a series on modality, a SeriesDescription regular expression and SOP class; our own
results (SEG, RTSTRUCT, SR, PDF, or anything whose Manufacturer is ours) never match any rule, so storing
results into a study cannot trigger new jobs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

OUR_MANUFACTURER = "Orthanc AI"

#: SOP classes we write as results; never routed to a model.
RESULT_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.66.4",   # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set Storage
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
})
RESULT_MODALITIES = frozenset({"SEG", "RTSTRUCT", "SR", "DOC", "KO", "PR"})


class RuleError(ValueError):
    """A rule in the configuration is malformed."""


@dataclass(frozen=True)
class Rule:
    name: str
    model: str
    modalities: frozenset[str] = frozenset()
    series_description: re.Pattern | None = None
    sop_classes: frozenset[str] = frozenset()

    def matches(self, series: Mapping[str, str]) -> bool:
        if is_own_output(series):
            return False
        if self.modalities and series.get("Modality", "").upper() not in self.modalities:
            return False
        if self.series_description and not self.series_description.search(series.get("SeriesDescription", "")):
            return False
        if self.sop_classes and series.get("SOPClassUID", "") not in self.sop_classes:
            return False
        return True


def is_own_output(series: Mapping[str, str]) -> bool:
    """True for series we wrote (or result objects of any origin): they are never inputs."""
    return (series.get("Manufacturer", "") == OUR_MANUFACTURER
            or series.get("SOPClassUID", "") in RESULT_SOP_CLASSES
            or series.get("Modality", "").upper() in RESULT_MODALITIES)


def _strings(value: object, key: str, index: int) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RuleError(f"rule {index}: {key} must be a string or a list of strings")
    return frozenset(value)


def parse_rules(raw: Iterable[object]) -> list[Rule]:
    rules = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise RuleError(f"rule {i} must be a JSON object")
        unknown = set(item) - {"Name", "Model", "Modality", "SeriesDescription", "SOPClassUID"}
        if unknown:
            raise RuleError(f"rule {i}: unknown key(s) {', '.join(sorted(unknown))}")
        model = item.get("Model")
        if not isinstance(model, str) or not model:
            raise RuleError(f"rule {i}: Model (a model id) is required")
        pattern = item.get("SeriesDescription")
        regex = None
        if pattern is not None:
            if not isinstance(pattern, str):
                raise RuleError(f"rule {i}: SeriesDescription must be a regular expression string")
            try:
                regex = re.compile(pattern, re.I)
            except re.error as exc:
                raise RuleError(f"rule {i}: SeriesDescription is not a valid regular expression ({exc})") from None
        rules.append(Rule(
            name=str(item.get("Name") or f"rule {i}"), model=model,
            modalities=frozenset(m.upper() for m in _strings(item.get("Modality"), "Modality", i)),
            series_description=regex, sop_classes=_strings(item.get("SOPClassUID"), "SOPClassUID", i)))
    return rules


def route(rules: Iterable[Rule], series: Mapping[str, str]) -> list[str]:
    """Model ids the series should go to, in rule order, without duplicates."""
    out: list[str] = []
    for rule in rules:
        if rule.matches(series) and rule.model not in out:
            out.append(rule.model)
    return out
