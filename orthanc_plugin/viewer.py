"""The OHIF viewer at ``/ohif/``, served by Orthanc itself.

Same origin as ``/dicom-web`` and ``/ai`` (Orthanc 1.10 has no CORS), behind the same HTTP Basic
authentication: Orthanc authenticates before any plugin callback runs. The files are the prebuilt OHIF
dist patched for the ``/ohif/`` prefix plus our app config and extension, installed by
``viewer_extension/install.py`` (``make viewer``). ServeFolders cannot do this: it has no SPA fallback
and serves ``.mjs`` as octet-stream, which a module ``import()`` refuses.
"""

from __future__ import annotations

import json
import mimetypes
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from orthanc_plugin.routes import Request, Response

URL_PREFIX = "/ohif"
STAMP = ".orthanc-ai-viewer.json"  # written by viewer_extension/install.py

MIME_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".cjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".jsonc": "application/json",
    ".map": "application/json",
    ".webmanifest": "application/manifest+json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".gif": "image/gif",
    ".ico": "image/x-icon",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".xml": "application/xml",
    ".txt": "text/plain; charset=utf-8",
    ".onnx": "application/octet-stream",
}

# Content-hashed build outputs never change under the same name: cache them for a year. Not the ones
# the installer patched (their names keep the hash of the unpatched content), nor index.html, our config
# and our extension: those are revalidated on every load (ETag, 304 when unchanged).
_HASHED = re.compile(r"(^|[.\-_])[0-9a-f]{16}(\.(bundle|min))?\.(js|mjs|wasm|css|woff2?)$")
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
SHORT = "public, max-age=3600"  # other unhashed assets (icons, fonts, onnxruntime, microscopy viewer)
_OURS = ("index.html", "app-config.js", "ai-ext/")


@dataclass
class Asset:
    """What to answer: a status, a body (None for an empty answer), its type and extra headers."""

    status: int
    body: bytes | None = None
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


def content_type(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    return MIME_TYPES.get(ext) or mimetypes.guess_type(path)[0] or "application/octet-stream"


def cache_control(rel: str, patched: frozenset[str] = frozenset()) -> str:
    if rel == "" or rel.endswith(".html") or rel.startswith(_OURS) or rel in patched:
        return REVALIDATE
    if _HASHED.search(os.path.basename(rel)):
        return IMMUTABLE
    return SHORT


def etag(stat: os.stat_result) -> str:
    """A validator that changes whenever the installer rewrites the file."""
    return f'W/"{stat.st_size:x}-{stat.st_mtime_ns:x}"'


class ViewerFiles:
    """Maps ``/ohif/<rel>`` to a file of the installed viewer, with an SPA fallback to index.html."""

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.realpath(root))
        self._patched: tuple[float, frozenset[str]] | None = None

    def installed(self) -> dict | None:
        try:
            stamp = json.loads((self.root / STAMP).read_text())
        except (OSError, ValueError):
            return None
        return stamp if isinstance(stamp, dict) else None

    def patched_files(self) -> frozenset[str]:
        """Files the installer patched (listed in its stamp), re-read when the stamp changes."""
        try:
            mtime = (self.root / STAMP).stat().st_mtime
        except OSError:
            return frozenset()
        if self._patched is None or self._patched[0] != mtime:
            self._patched = (mtime, frozenset((self.installed() or {}).get("patched_files") or ()))
        return self._patched[1]

    def _inside(self, rel: str) -> Path | None:
        """The real path of ``rel`` if it stays inside the viewer folder (links and ``..`` resolved)."""
        candidate = os.path.realpath(os.path.join(self.root, rel))
        if os.path.commonpath([candidate, str(self.root)]) != str(self.root):
            return None
        return Path(candidate)

    def get(self, rel: str, if_none_match: str | None = None) -> Asset:
        rel = rel.lstrip("/")
        if "\x00" in rel or "\\" in rel:
            return Asset(400, b"bad path\n")
        if not (self.root / "index.html").is_file():
            return Asset(503, b"The viewer is not installed on this server: run `make viewer` "
                              b"(viewer_extension/install.py).\n")
        if rel.startswith(".") or "/." in rel:
            return Asset(404, b"not found\n")  # our stamp, temporary install folders, dotfiles
        path = self._inside(rel)
        if path is None:
            return Asset(404, b"not found\n")
        if not path.is_file():
            last = rel.rstrip("/").rsplit("/", 1)[-1]
            if "." in last:  # a missing asset: no HTML in place of a script or an image
                return Asset(404, b"not found\n")
            rel, path = "index.html", self.root / "index.html"  # a client-side route: /ohif/viewer, /ohif/followup
        tag = etag(path.stat())
        headers = {"Cache-Control": cache_control(rel, self.patched_files()), "ETag": tag,
                   "X-Content-Type-Options": "nosniff"}
        if if_none_match and tag in [t.strip() for t in if_none_match.split(",")]:
            return Asset(304, None, content_type(str(path)), headers)
        return Asset(200, path.read_bytes(), content_type(str(path)), headers)


def _answer(output, asset: Asset) -> None:
    for key, value in asset.headers.items():
        output.SetHttpHeader(key, value)
    if asset.status == 200:
        output.AnswerBuffer(asset.body, asset.content_type)
        return
    if not asset.body:
        output.SendHttpStatusCode(asset.status)
        return
    output.SetHttpHeader("Content-Type", asset.content_type)
    try:  # plugin 4.0 takes (status, str, size); later versions take (status, bytes)
        output.SendHttpStatus(asset.status, asset.body.decode(), len(asset.body))
    except TypeError:
        output.SendHttpStatus(asset.status, asset.body)


def status_route(files: ViewerFiles) -> Callable[[Request], Response]:
    """``GET /ai/viewer``: whether the viewer is installed, which OHIF version, and where."""

    def handler(request: Request) -> Response:
        stamp = files.installed() or {}
        return 200, {"installed": bool(stamp), "url": URL_PREFIX + "/", "ohif_version": stamp.get("version"),
                     "package": stamp.get("package")}

    return handler


def register(orthanc, api, directory: Path) -> ViewerFiles:
    """Serve ``directory`` at ``/ohif/`` and add ``GET /ai/viewer``."""
    files = ViewerFiles(directory)

    def serve(output, uri, **request) -> None:
        if request["method"] != "GET":
            output.SendMethodNotAllowed("GET")
            return
        groups = request.get("groups") or ()
        headers = request.get("headers") or {}
        _answer(output, files.get(groups[0] if groups else "", headers.get("if-none-match")))

    # Orthanc normalises "/ohif/" to "/ohif", which only the first pattern catches.
    orthanc.RegisterRestCallback(URL_PREFIX, serve)
    orthanc.RegisterRestCallback(URL_PREFIX + "/(.*)", serve)
    api.add_routes([("GET", r"viewer", status_route(files))])
    return files
