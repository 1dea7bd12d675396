"""Start-up: a bad "AI" value stops Orthanc with a message naming the key; credentials handling."""

import os
import stat
import subprocess

from orthanc_plugin import launcher
from tests.integration.harness import OrthancServer


def test_bad_config_stops_startup_naming_the_key(tmp_path):
    server = OrthancServer(tmp_path, overrides={"AI": {"WorkerCount": "many"}})
    server.start(wait=False)
    try:
        code = server.process.wait(30)
    except subprocess.TimeoutExpired:
        server.stop()
        raise AssertionError("Orthanc kept running with an invalid AI.WorkerCount")
    assert code != 0
    assert "AI.WorkerCount" in server.log()


def test_generated_credentials_are_private_and_stable(tmp_path, monkeypatch):
    monkeypatch.delenv("ORTHANC_AI_USER", raising=False)
    monkeypatch.delenv("ORTHANC_AI_PASSWORD", raising=False)
    user, password, path = launcher.credentials(tmp_path)
    assert path == tmp_path / "credentials" and len(password) >= 24
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert launcher.credentials(tmp_path)[:2] == (user, password)  # the second start reuses them
    monkeypatch.setenv("ORTHANC_AI_USER", "ops")
    monkeypatch.setenv("ORTHANC_AI_PASSWORD", "from-env")
    assert launcher.credentials(tmp_path)[:2] == ("ops", "from-env")


def test_effective_config_applies_ports_and_bind(tmp_path):
    cfg = launcher.build_config(tmp_path, http_port=18042, dicom_port=14242, bind="0.0.0.0", user="u", password="p")
    assert cfg["HttpPort"] == 18042 and cfg["DicomPort"] == 14242
    assert cfg["RemoteAccessAllowed"] is True and cfg["AuthenticationEnabled"] is True
    assert cfg["AI"]["DataDirectory"] == str(tmp_path)
    assert launcher.build_config(tmp_path, http_port=1, dicom_port=2, bind="127.0.0.1", user="u",
                                 password="p")["RemoteAccessAllowed"] is False
