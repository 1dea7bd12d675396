"""Serving the OHIF viewer at /ohif/ and installing it, without a browser or a server."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from orthanc_plugin import viewer
from orthanc_plugin.routes import Request
from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("viewer_install", REPO / "viewer_extension" / "install.py")
install = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install)


@pytest.fixture()
def dist(tmp_path: Path) -> Path:
    root = tmp_path / "ohif"
    (root / "ai-ext").mkdir(parents=True)
    (root / "assets").mkdir()
    (root / "index.html").write_text('<script src="/ohif/app-config.js"></script>')
    (root / "app-config.js").write_text("window.config = {};")
    (root / "app.bundle.0f6159c501addfe9.js").write_text("patched")
    (root / "89.bundle.b327bf3664812958.js").write_text("chunk")
    (root / "0ddf166f7a343eda.wasm").write_bytes(b"\0asm")
    (root / "ai-ext" / "index.js").write_text("export default {};")
    (root / "assets" / "favicon.ico").write_bytes(b"ico")
    (root / "app.bundle.css").write_text("body{}")
    (root / viewer.STAMP).write_text(json.dumps({"package": "@ohif/app", "version": "3.13.2",
                                                 "patched_files": ["app.bundle.0f6159c501addfe9.js", "index.html"]}))
    (tmp_path / "secret.txt").write_text("outside the viewer")
    return root


def test_content_types_for_modules_wasm_and_maps():
    assert viewer.content_type("x/app.bundle.1234.js").startswith("text/javascript")
    assert viewer.content_type("lib.mjs").startswith("text/javascript")  # strict MIME check of import()
    assert viewer.content_type("a.wasm") == "application/wasm"
    assert viewer.content_type("a.js.map") == "application/json"
    assert viewer.content_type("a.css").startswith("text/css")
    assert viewer.content_type("font.woff2") == "font/woff2"
    assert viewer.content_type("blob.unknownext") == "application/octet-stream"


def test_cache_headers():
    patched = frozenset({"app.bundle.0f6159c501addfe9.js"})
    assert viewer.cache_control("89.bundle.b327bf3664812958.js", patched) == viewer.IMMUTABLE
    assert viewer.cache_control("0ddf166f7a343eda.wasm", patched) == viewer.IMMUTABLE
    assert viewer.cache_control("app.bundle.0f6159c501addfe9.js", patched) == viewer.REVALIDATE  # name keeps the old hash
    for rel in ("", "index.html", "app-config.js", "ai-ext/index.js", "ai-ext/segment.js"):
        assert viewer.cache_control(rel, patched) == viewer.REVALIDATE, rel
    assert viewer.cache_control("assets/favicon.ico", patched) == viewer.SHORT
    assert viewer.cache_control("app.bundle.css", patched) == viewer.SHORT


def test_files_spa_fallback_and_assets(dist):
    files = viewer.ViewerFiles(dist)
    for route in ("", "viewer", "viewer/", "followup", "segmentation", "local"):
        answer = files.get(route)
        assert answer.status == 200 and answer.body.startswith(b"<script"), route
        assert answer.content_type.startswith("text/html") and answer.headers["Cache-Control"] == viewer.REVALIDATE
    module = files.get("ai-ext/index.js")
    assert module.status == 200 and module.content_type.startswith("text/javascript")
    assert module.headers["X-Content-Type-Options"] == "nosniff"
    bundle = files.get("89.bundle.b327bf3664812958.js")
    assert bundle.headers["Cache-Control"] == viewer.IMMUTABLE and bundle.body == b"chunk"
    assert files.get("app.bundle.0f6159c501addfe9.js").headers["Cache-Control"] == viewer.REVALIDATE
    assert files.get("missing.bundle.js").status == 404  # never HTML in place of a script
    assert files.get("assets/missing.png").status == 404


def test_files_refuse_paths_outside_the_viewer(dist):
    files = viewer.ViewerFiles(dist)
    os.symlink(dist.parent / "secret.txt", dist / "link.txt")
    for rel in ("../secret.txt", "assets/../../secret.txt", "link.txt", "/../secret.txt", "..\\secret.txt",
                "a\x00b.js", viewer.STAMP, ".ohif-install-x/index.html"):
        answer = files.get(rel)
        assert answer.status in (400, 404), rel
        assert not answer.body or b"outside" not in answer.body, rel
    # a directory-like route that escapes is not served index.html from elsewhere either
    assert files.get("../").status in (200, 404)


def test_etag_and_not_modified(dist):
    files = viewer.ViewerFiles(dist)
    first = files.get("ai-ext/index.js")
    tag = first.headers["ETag"]
    again = files.get("ai-ext/index.js", if_none_match=f'"other", {tag}')
    assert again.status == 304 and again.body is None and again.headers["ETag"] == tag
    (dist / "ai-ext" / "index.js").write_text("export default { changed: true };")
    assert files.get("ai-ext/index.js", if_none_match=tag).status == 200


def test_not_installed_says_how_to_install(tmp_path):
    answer = viewer.ViewerFiles(tmp_path / "nothing").get("viewer")
    assert answer.status == 503 and b"make viewer" in answer.body


class FakeOutput:
    def __init__(self):
        self.headers, self.answer, self.status = {}, None, None

    def SetHttpHeader(self, key, value):
        self.headers[key] = value

    def AnswerBuffer(self, body, content_type):
        self.status, self.answer, self.headers["Content-Type"] = 200, body, content_type

    def SendHttpStatusCode(self, status):
        self.status = status

    def SendHttpStatus(self, status, body, size=None):
        self.status, self.answer = status, body

    def SendMethodNotAllowed(self, allowed):
        self.status = 405


class FakeOrthanc:
    def __init__(self):
        self.callbacks = {}

    def RegisterRestCallback(self, pattern, callback):
        self.callbacks[pattern] = callback


class FakeApi:
    def __init__(self):
        self.routes = []

    def add_routes(self, routes):
        self.routes.extend(routes)


def test_register_serves_both_prefix_forms_and_the_status_route(dist):
    orthanc, api = FakeOrthanc(), FakeApi()
    viewer.register(orthanc, api, dist)
    assert set(orthanc.callbacks) == {"/ohif", "/ohif/(.*)"}  # Orthanc hands "/ohif/" over as "/ohif"
    out = FakeOutput()
    orthanc.callbacks["/ohif"](out, "/ohif", method="GET", groups=(), headers={})
    assert out.status == 200 and out.headers["Content-Type"].startswith("text/html")
    out = FakeOutput()
    orthanc.callbacks["/ohif/(.*)"](out, "/ohif/ai-ext/index.js", method="GET", groups=("ai-ext/index.js",), headers={})
    assert out.status == 200 and out.headers["Cache-Control"] == viewer.REVALIDATE and "ETag" in out.headers
    tag = out.headers["ETag"]
    out = FakeOutput()
    orthanc.callbacks["/ohif/(.*)"](out, "", method="GET", groups=("ai-ext/index.js",), headers={"if-none-match": tag})
    assert out.status == 304
    out = FakeOutput()
    orthanc.callbacks["/ohif/(.*)"](out, "", method="POST", groups=("viewer",), headers={})
    assert out.status == 405
    out = FakeOutput()
    orthanc.callbacks["/ohif/(.*)"](out, "", method="GET", groups=("nope.js",), headers={})
    assert out.status == 404
    (method, pattern, handler), = api.routes
    assert (method, pattern) == ("GET", "viewer")
    status, body = handler(Request("GET", "viewer", {}, b"", {}))
    assert status == 200 and body == {"installed": True, "url": "/ohif/", "ohif_version": "3.13.2",
                                      "package": "@ohif/app"}


# -- installer -----------------------------------------------------------------------------------------

def _tarball(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_installer_patch_counts_are_checked(tmp_path):
    (tmp_path / "index.html").write_text('<script>window.PUBLIC_URL="/"</script>')
    with pytest.raises(install.InstallError, match="layout changed"):
        install.apply_patches(tmp_path)


def test_installer_unpacks_dist_without_maps_or_escapes(tmp_path):
    tgz = _tarball(tmp_path / "p.tgz", {"package/dist/index.html": "x", "package/dist/a.js": "a",
                                        "package/dist/a.js.map": "{}", "package/README.md": "r",
                                        "package/dist/../../evil.txt": "e"})
    out = tmp_path / "out"
    out.mkdir()
    install.unpack(tgz, out)
    assert sorted(p.name for p in out.rglob("*")) == ["a.js", "index.html"]
    assert not (tmp_path / "evil.txt").exists()


def test_installer_checks_the_pinned_integrity(tmp_path):
    tgz = _tarball(tmp_path / install.tarball_name(), {"package/dist/index.html": "x"})
    with pytest.raises(install.InstallError, match="integrity"):
        install.fetch_tarball(tmp_path, None)
    assert tgz.exists()


def test_installer_skips_a_done_install_and_syncs_our_files(tmp_path):
    dest = tmp_path / "ohif"
    dest.mkdir()
    (dest / install.STAMP).write_text(json.dumps({**install.stamp_expected(install.OHIF_INTEGRITY),
                                                  "patched_files": ["index.html"]}))
    assert install.install_dist(dest, tmp_path / "no-cache", None) is False  # no tarball needed
    source = tmp_path / "src"
    (source / "ai-ext").mkdir(parents=True)
    (source / "app-config.js").write_text("cfg")
    (source / "ai-ext" / "index.js").write_text("one")
    (dest / "ai-ext").mkdir()
    (dest / "ai-ext" / "old.js").write_text("stale")
    assert install.sync_our_files(dest, source) == 3  # two copied, one stale removed
    assert install.sync_our_files(dest, source) == 0
    assert (dest / "app-config.js").read_text() == "cfg" and not (dest / "ai-ext" / "old.js").exists()


def test_our_files_exist_and_app_config_loads_the_extension_guarded():
    ext = REPO / "viewer_extension"
    config = (ext / "app-config.js").read_text()
    assert "import(EXTENSION_URL)" in config and ".catch(" in config
    assert "const EXTENSION_URL = '/ohif/ai-ext/index.js'" in config and (ext / "ai-ext" / "index.js").is_file()
    assert "routerBasename: '/ohif'" in config


@pytest.mark.skipif(not shutil.which("node"), reason="node is not installed: JavaScript syntax not checked")
def test_javascript_parses():
    ext = REPO / "viewer_extension"
    for path in sorted((ext / "ai-ext").glob("*.js")):
        result = subprocess.run(["node", "--input-type=module", "--check"], input=path.read_text(),
                                capture_output=True, text=True)
        assert result.returncode == 0, f"{path.name}: {result.stderr}"
    result = subprocess.run(["node", "--check", str(ext / "app-config.js")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
