"""Routing rules: matching on modality, description regex and SOP class; our outputs never match."""

import pytest

from orthanc_plugin.rules import OUR_MANUFACTURER, RuleError, is_own_output, parse_rules, route

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"


def series(**tags):
    base = {"Modality": "MR", "SeriesDescription": "t1_fl2d_sag", "SOPClassUID": MR_IMAGE, "Manufacturer": "SIEMENS"}
    base.update(tags)
    return base


def test_default_like_rule_routes_mr_only():
    rules = parse_rules([{"Modality": "MR", "Model": "brain"}])
    assert route(rules, series()) == ["brain"]
    assert route(rules, series(Modality="CT")) == []


def test_description_regex_and_sop_class():
    rules = parse_rules([{"Modality": ["MR"], "SeriesDescription": "flair|t2", "Model": "a"},
                         {"SOPClassUID": MR_IMAGE, "Model": "b"}])
    assert route(rules, series(SeriesDescription="AX FLAIR")) == ["a", "b"]
    assert route(rules, series()) == ["b"]


def test_own_outputs_never_match_even_a_catch_all_rule():
    rules = parse_rules([{"Model": "any"}])
    assert route(rules, series(Modality="SEG", SOPClassUID=SEG)) == []
    assert route(rules, series(Manufacturer=OUR_MANUFACTURER)) == []
    assert is_own_output(series(Modality="SR"))
    assert not is_own_output(series())


def test_duplicates_removed_in_rule_order():
    rules = parse_rules([{"Model": "x"}, {"Modality": "MR", "Model": "x"}, {"Model": "y"}])
    assert route(rules, series()) == ["x", "y"]


@pytest.mark.parametrize("raw,needle", [
    ([{"Modality": "MR"}], "Model"),
    ([{"Model": "m", "SeriesDescription": "("}], "regular expression"),
    ([{"Model": "m", "Colour": "red"}], "unknown key"),
    ([{"Model": "m", "Modality": 3}], "Modality"),
    (["MR"], "JSON object"),
])
def test_bad_rules_are_explained(raw, needle):
    with pytest.raises(RuleError, match=needle):
        parse_rules(raw)


def test_condition_tree_and_extra_attributes():
    rules = parse_rules([{"Model": "head", "Priority": "urgent", "Match": {"all": [
        {"attribute": "BodyPartExamined", "equals": ["HEAD", "BRAIN"]},
        {"not": {"attribute": "StationName", "equals": "OLDSCANNER"}},
        {"any": [{"attribute": "NumberOfInstances", "greater_than": 20},
                 {"attribute": "SeriesDescription", "matches": "^flair"}]}]}},
        {"Model": "from-er", "RemoteAET": "ER_CT", "Priority": "off-peak"}])
    head = series(BodyPartExamined="head", StationName="MR1", NumberOfInstances="35")
    assert route(rules, head) == ["head"] and rules[0].job_priority > rules[1].job_priority
    assert route(rules, dict(head, StationName="OLDSCANNER")) == []
    assert route(rules, dict(head, NumberOfInstances="3")) == []
    assert route(rules, dict(head, NumberOfInstances="3", SeriesDescription="FLAIR ax")) == ["head"]
    assert route(rules, series(RemoteAET="ER_CT")) == ["from-er"]


@pytest.mark.parametrize("match,needle", [
    ({"attribute": "Modality"}, "exactly one"),
    ({"attribute": "Modality", "resembles": "MR"}, "unknown operator"),
    ({"all": []}, "non-empty"),
    ({"attribute": "NumberOfInstances", "greater_than": "20"}, "number"),
    ({"equals": "MR"}, "attribute"),
])
def test_bad_conditions_are_explained(match, needle):
    with pytest.raises(RuleError, match=needle):
        parse_rules([{"Model": "m", "Match": match}])


def test_disabled_rule_never_matches():
    assert route(parse_rules([{"Model": "m", "Enabled": False}]), series()) == []
