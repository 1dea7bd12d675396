"""Routing rules: which series of a stable study go to which model, at which priority, and where results go.

A rule is JSON, never code: shorthand keys (``Modality``, ``SeriesDescription`` regex, ``SOPClassUID``,
``BodyPartExamined``, ``StationName``, ``RemoteAET``, ``Manufacturer``, ``ProtocolName``) that must all hold,
and/or a ``Match`` condition tree::

    {"all": [c1, c2]}  {"any": [c1, c2]}  {"not": c}
    {"attribute": "BodyPartExamined", "equals": "HEAD"}        (a string or a list of accepted values)
    {"attribute": "SeriesDescription", "matches": "flair|t2"}   (case-insensitive regular expression)
    {"attribute": "NumberOfInstances", "greater_than": 20}      (also less_than; numbers)
    {"attribute": "StationName", "exists": true}

Our own results (SEG, RTSTRUCT, SR, PDF, or Manufacturer ``Orthanc AI``) never match any rule, so storing
results into a study cannot trigger new jobs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

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

#: Job priority of each rule priority name (manual requests from a viewer sit between urgent and normal).
PRIORITIES = {"urgent": 10, "normal": 0, "off-peak": -10}
MANUAL_PRIORITY = 5

SHORTHAND = ("Modality", "SeriesDescription", "SOPClassUID", "BodyPartExamined", "StationName", "RemoteAET",
             "Manufacturer", "ProtocolName")
_RULE_KEYS = {"Name", "Model", "Models", "Priority", "Destinations", "Enabled", "Match", *SHORTHAND}


class RuleError(ValueError):
    """A rule in the configuration is malformed."""


@dataclass(frozen=True)
class Condition:
    """A node of the condition tree (see the module docstring)."""

    op: str                      # all | any | not | equals | matches | greater_than | less_than | exists
    attribute: str = ""
    value: Any = None
    children: tuple["Condition", ...] = ()

    def holds(self, series: Mapping[str, Any]) -> bool:
        if self.op == "all":
            return all(c.holds(series) for c in self.children)
        if self.op == "any":
            return any(c.holds(series) for c in self.children)
        if self.op == "not":
            return not self.children[0].holds(series)
        actual = series.get(self.attribute)
        if self.op == "exists":
            return (actual not in (None, "")) == self.value
        if actual is None:
            return False
        if self.op == "equals":
            return str(actual).strip().upper() in self.value
        if self.op == "matches":
            return bool(self.value.search(str(actual)))
        try:
            number = float(actual)
        except (TypeError, ValueError):
            return False
        return number > self.value if self.op == "greater_than" else number < self.value


@dataclass(frozen=True)
class Rule:
    name: str
    models: tuple[str, ...]
    condition: Condition
    priority: str = "normal"
    destinations: tuple[str, ...] = ()
    enabled: bool = True

    @property
    def model(self) -> str:
        return self.models[0]

    @property
    def job_priority(self) -> int:
        return PRIORITIES[self.priority]

    def matches(self, series: Mapping[str, Any]) -> bool:
        return self.enabled and not is_own_output(series) and self.condition.holds(series)


def is_own_output(series: Mapping[str, Any]) -> bool:
    """True for series we wrote (or result objects of any origin): they are never inputs."""
    return (series.get("Manufacturer", "") == OUR_MANUFACTURER
            or series.get("SOPClassUID", "") in RESULT_SOP_CLASSES
            or str(series.get("Modality", "")).upper() in RESULT_MODALITIES)


def _strings(value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise RuleError(f"{where} must be a non-empty string or list of strings")
    return tuple(value)


def _regex(pattern: object, where: str) -> re.Pattern:
    if not isinstance(pattern, str):
        raise RuleError(f"{where} must be a regular expression string")
    try:
        return re.compile(pattern, re.I)
    except re.error as exc:
        raise RuleError(f"{where} is not a valid regular expression ({exc})") from None


def parse_condition(raw: object, where: str) -> Condition:
    if not isinstance(raw, dict):
        raise RuleError(f"{where} must be a JSON object")
    for group in ("all", "any"):
        if group in raw:
            items = raw[group]
            if set(raw) != {group} or not isinstance(items, list) or not items:
                raise RuleError(f'{where}: "{group}" takes a non-empty list and nothing beside it')
            return Condition(group, children=tuple(parse_condition(c, f"{where}.{group}[{i}]")
                                                   for i, c in enumerate(items)))
    if "not" in raw:
        if set(raw) != {"not"}:
            raise RuleError(f'{where}: "not" takes one condition and nothing beside it')
        return Condition("not", children=(parse_condition(raw["not"], f"{where}.not"),))
    attribute = raw.get("attribute")
    if not isinstance(attribute, str) or not attribute:
        raise RuleError(f'{where} needs "attribute" (or "all"/"any"/"not")')
    ops = set(raw) - {"attribute"}
    if len(ops) != 1:
        raise RuleError(f"{where} needs exactly one of equals, matches, greater_than, less_than, exists")
    op = ops.pop()
    value = raw[op]
    if op == "equals":
        value = frozenset(v.strip().upper() for v in _strings(value, f"{where}.equals"))
    elif op == "matches":
        value = _regex(value, f"{where}.matches")
    elif op in ("greater_than", "less_than"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RuleError(f"{where}.{op} must be a number")
    elif op == "exists":
        if not isinstance(value, bool):
            raise RuleError(f"{where}.exists must be true or false")
    else:
        raise RuleError(f"{where}: unknown operator '{op}'")
    return Condition(op, attribute, value)


def parse_rules(raw: Iterable[object], *, destinations: Iterable[str] | None = None) -> list[Rule]:
    """Validate rules; ``destinations`` (when given) are the names a rule may forward to."""
    known = set(destinations) if destinations is not None else None
    rules = []
    for i, item in enumerate(raw):
        where = f"rule {i}"
        if not isinstance(item, dict):
            raise RuleError(f"{where} must be a JSON object")
        where = f"rule {i} ({item.get('Name')})" if item.get("Name") else where
        unknown = set(item) - _RULE_KEYS
        if unknown:
            raise RuleError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        if ("Model" in item) == ("Models" in item):
            raise RuleError(f"{where}: Model (a model id) or Models (a list) is required, not both")
        models = _strings(item.get("Model", item.get("Models")), f"{where}: Model")
        conditions = []
        for key in SHORTHAND:
            if key not in item:
                continue
            if key == "SeriesDescription":
                conditions.append(Condition("matches", key, _regex(item[key], f"{where}: SeriesDescription")))
            else:
                values = _strings(item[key], f"{where}: {key}")
                conditions.append(Condition("equals", key, frozenset(v.strip().upper() for v in values)))
        if "Match" in item:
            conditions.append(parse_condition(item["Match"], f"{where}: Match"))
        priority = item.get("Priority", "normal")
        if priority not in PRIORITIES:
            raise RuleError(f"{where}: Priority must be one of {', '.join(PRIORITIES)}")
        dests = _strings(item["Destinations"], f"{where}: Destinations") if "Destinations" in item else ()
        if known is not None:
            missing = [d for d in dests if d not in known]
            if missing:
                raise RuleError(f"{where}: unknown destination(s) {', '.join(missing)} (declare them in AI.Destinations)")
        enabled = item.get("Enabled", True)
        if not isinstance(enabled, bool):
            raise RuleError(f"{where}: Enabled must be true or false")
        rules.append(Rule(name=str(item.get("Name") or f"rule {i}"), models=models,
                          condition=Condition("all", children=tuple(conditions)), priority=priority,
                          destinations=dests, enabled=enabled))
    return rules


def matching_rules(rules: Iterable[Rule], series: Mapping[str, Any]) -> list[Rule]:
    return [rule for rule in rules if rule.matches(series)]


def route(rules: Iterable[Rule], series: Mapping[str, Any]) -> list[str]:
    """Model ids the series should go to, in rule order, without duplicates."""
    out: list[str] = []
    for rule in matching_rules(rules, series):
        out.extend(m for m in rule.models if m not in out)
    return out
