"""Configuration validation: a bad value stops start-up with a message that names the key."""

import pytest

from orthanc_plugin.config import ConfigError, parse_config, strip_json_comments


def test_defaults(tmp_path):
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").touch()
    cfg = parse_config({}, base=tmp_path)
    assert cfg.worker_count == 1 and cfg.max_attempts == 3
    assert cfg.rules[0].model == "brain-lesion-candidates"
    assert cfg.job_store_path == tmp_path / "var" / "ai-jobs.sqlite"


@pytest.mark.parametrize("section,key", [
    ({"WorkerCount": "two"}, "AI.WorkerCount"),
    ({"WorkerCount": 99}, "AI.WorkerCount"),
    ({"LeaseSeconds": 1}, "AI.LeaseSeconds"),
    ({"MaxAttempts": 0}, "AI.MaxAttempts"),
    ({"Enabled": "yes"}, "AI.Enabled"),
    ({"ModelsDirectory": "/nonexistent/models"}, "AI.ModelsDirectory"),
    ({"Rules": [{"Modality": "MR"}]}, "AI.Rules"),
    ({"Rulez": []}, "Rulez"),
    ({"WorkerCount": 1, "WorkerPython": "/nonexistent/python"}, "AI.WorkerPython"),
    ({"LeaseSeconds": True}, "AI.LeaseSeconds"),
])
def test_bad_values_name_the_key(section, key, tmp_path):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config({"AI": {"WorkerCount": 0, **section}}, base=tmp_path)


def test_strip_comments_keeps_strings():
    text = '{ // c\n "a": "http://x/*y*/", /* b */ "b": 1 }'
    import json
    assert json.loads(strip_json_comments(text)) == {"a": "http://x/*y*/", "b": 1}


@pytest.mark.parametrize("section,key", [
    ({"Report": {"Language": "de"}}, "AI.Report.Language"),
    ({"Report": {"TemplateDirectory": "/nonexistent"}}, "AI.Report.TemplateDirectory"),
    ({"Report": {"Logo": "x"}}, "AI.Report"),
    ({"ApprovedModels": {"spleen": "abc"}}, "AI.ApprovedModels.spleen"),
])
def test_report_and_approval_values_are_checked(section, key, tmp_path):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config({"AI": {"WorkerCount": 0, **section}}, base=tmp_path)


def test_report_settings_parsed(tmp_path):
    cfg = parse_config({"AI": {"WorkerCount": 0, "Report": {"Language": "fr", "TemplateDirectory": str(tmp_path)},
                               "ApprovedModels": {"spleen": "a" * 64}}}, base=tmp_path)
    assert cfg.report_language == "fr" and cfg.report_template_directory == tmp_path
    assert cfg.approved_models == {"spleen": "a" * 64}


def test_destinations_must_exist_in_orthanc_config(tmp_path):
    full = {"DicomModalities": {"pacs": ["PACS", "127.0.0.1", 104]}, "OrthancPeers": {"peer": ["http://x/"]},
            "AI": {"WorkerCount": 0, "Destinations": {"main": {"Type": "dicom", "Target": "pacs"},
                                                      "mirror": {"Type": "peer", "Target": "peer"}},
                   "Rules": [{"Modality": "MR", "Model": "m", "Destinations": ["main"], "Priority": "urgent"}]}}
    cfg = parse_config(full, base=tmp_path)
    assert cfg.destinations["main"].type == "dicom" and cfg.rules[0].destinations == ("main",)
    assert cfg.rules[0].job_priority > 0
    bad = dict(full, AI={**full["AI"], "Destinations": {"main": {"Type": "dicom", "Target": "nowhere"}}})
    with pytest.raises(ConfigError, match="nowhere"):
        parse_config(bad, base=tmp_path)
    unknown = dict(full, AI={**full["AI"], "Rules": [{"Model": "m", "Destinations": ["ghost"]}]})
    with pytest.raises(ConfigError, match="ghost"):
        parse_config(unknown, base=tmp_path)
    with pytest.raises(ConfigError, match="AI.Outbox.MaxAgeSeconds"):
        parse_config({"AI": {"WorkerCount": 0, "Outbox": {"MaxAgeSeconds": -1}}}, base=tmp_path)
