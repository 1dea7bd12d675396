"""Start Orthanc with our plugin and the embedded defaults (``make run``; the tests use it too).

Reads the repository's ``orthanc.json``, applies the environment (ports, data directory, bind address,
credentials: environment variables override secrets and ports only), writes the effective configuration
into the data directory (mode 0600: it holds the password) and runs Orthanc in the foreground.

    ORTHANC_HTTP_PORT=8042 ORTHANC_DICOM_PORT=4242 ORTHANC_AI_DATA=./var ORTHANC_AI_BIND=127.0.0.1
    ORTHANC_AI_USER / ORTHANC_AI_PASSWORD (else generated once into $ORTHANC_AI_DATA/credentials)
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from orthanc_plugin.config import REPO_ROOT, strip_json_comments

PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
DEFAULT_USER = "admin"


def find_plugin(name: str) -> str:
    override = os.environ.get("ORTHANC_PLUGINS_DIR")
    for d in ([override] if override else []) + list(PLUGIN_DIRS):
        for candidate in sorted(Path(d).glob(f"{name}*")):
            return str(candidate)
    raise SystemExit(f"Orthanc plugin {name} not found in {', '.join(PLUGIN_DIRS)}: "
                     "install the Debian packages (make deps)")


def credentials(data_dir: Path) -> tuple[str, str, Path | None]:
    """(user, password, file) from the environment, else from (or newly into) the credentials file."""
    user, password = os.environ.get("ORTHANC_AI_USER"), os.environ.get("ORTHANC_AI_PASSWORD")
    if user and password:
        return user, password, None
    path = data_dir / "credentials"
    if path.exists():
        values = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
        return values["ORTHANC_AI_USER"], values["ORTHANC_AI_PASSWORD"], path
    user = user or DEFAULT_USER
    password = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"ORTHANC_AI_USER={user}\nORTHANC_AI_PASSWORD={password}\n")
    return user, password, path


def build_config(data_dir: Path, *, http_port: int, dicom_port: int, bind: str, user: str, password: str,
                 overrides: dict | None = None, template: Path = REPO_ROOT / "orthanc.json") -> dict:
    cfg = json.loads(strip_json_comments(template.read_text()))
    cfg.update({
        "HttpPort": http_port, "DicomPort": dicom_port,
        "StorageDirectory": str(data_dir / "orthanc-storage"), "IndexDirectory": str(data_dir / "orthanc-index"),
        # Orthanc 1.10 listens on every interface; RemoteAccessAllowed=false refuses non-loopback clients.
        "RemoteAccessAllowed": bind not in ("127.0.0.1", "localhost", "::1"),
        "AuthenticationEnabled": True, "RegisteredUsers": {user: password},
        "PythonScript": str(REPO_ROOT / "orthanc_plugin" / "main.py"),
        "Plugins": [find_plugin("libOrthancPython.so"), find_plugin("libOrthancDicomWeb.so")],
    })
    ai = dict(cfg.get("AI", {}))
    ai["DataDirectory"] = str(data_dir)
    cfg["AI"] = ai
    for key, value in (overrides or {}).items():
        if key == "AI":
            cfg["AI"].update(value)
        else:
            cfg[key] = value
    return cfg


def write_config(data_dir: Path, cfg: dict) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "orthanc.generated.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f, indent=2)
    return path


def orthanc_environment(user: str, password: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"TCP_NODELAY": "1", "ORTHANC_AI_USER": user, "ORTHANC_AI_PASSWORD": password})
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print-config", action="store_true", help="print the effective configuration and exit")
    args = parser.parse_args(argv)

    data_dir = Path(os.environ.get("ORTHANC_AI_DATA", "./var")).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    user, password, cred_file = credentials(data_dir)
    cfg = build_config(data_dir, http_port=int(os.environ.get("ORTHANC_HTTP_PORT", 8042)),
                       dicom_port=int(os.environ.get("ORTHANC_DICOM_PORT", 4242)),
                       bind=os.environ.get("ORTHANC_AI_BIND", "127.0.0.1"), user=user, password=password)
    if args.print_config:
        cfg["RegisteredUsers"] = {user: "********"}
        print(json.dumps(cfg, indent=2))
        return 0
    path = write_config(data_dir, cfg)
    orthanc_bin = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    print(f"Orthanc AI: http://127.0.0.1:{cfg['HttpPort']}/  DICOM {cfg['DicomAet']}@{cfg['DicomPort']}  "
          f"data {data_dir}", flush=True)
    print(f"  user '{user}', password " + (f"in {cred_file} (mode 0600)" if cred_file else
                                          "from $ORTHANC_AI_PASSWORD"), flush=True)
    print(f"  viewer/REST: curl -u {user}:… http://127.0.0.1:{cfg['HttpPort']}/ai/health ; Ctrl-C stops", flush=True)
    log_dir = data_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    proc = subprocess.Popen([orthanc_bin, f"--logdir={log_dir}", str(path)] if os.environ.get("ORTHANC_AI_LOG_TO_FILE")
                            else [orthanc_bin, str(path)], env=orthanc_environment(user, password))
    # Ctrl-C reaches Orthanc directly (same process group); forward SIGTERM too, then wait for a clean stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
