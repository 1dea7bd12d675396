#!/usr/bin/env python3
"""Install the OHIF viewer that Orthanc serves under ``/ohif/`` (``make viewer``; stdlib only).

1. Fetch the pinned ``@ohif/app`` tarball once with ``npm pack`` into a cache folder and check its
   sha512 against the pin below (no network at run time, nor on later installs).
2. Unpack its prebuilt ``dist/`` into a fresh folder, drop the source maps, and apply the sub-path
   patches (the dist assumes it lives at ``/``; Orthanc owns ``/``). Every patch must match exactly
   as often as expected, so an upgrade that moves the code fails here, loudly.
3. Install our own files beside it: ``app-config.js`` and the extension modules under ``ai-ext/``.

A second run only re-syncs our files (milliseconds): the heavy part is skipped when the stamp in
the installed folder names the same version, tarball and patch set.

    python3 viewer_extension/install.py [--dest build/ohif] [--cache build/cache] [--tarball FILE]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
OHIF_INTEGRITY = "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
PREFIX = "/ohif/"
PATCH_SET = 5  # bump when PATCHES change, so installed copies are redone

# (file glob, regex, replacement, expected number of matches over all the files of the glob).
# Found for 3.13.2: ../shared/research/OHIF.md §4, plus the web workers' own public paths.
PATCHES: list[tuple[str, str, str, int]] = [
    ("index.html", r'window\.PUBLIC_URL="/"', f'window.PUBLIC_URL="{PREFIX}"', 2),
    ("index.html", r'(href|src)="/(?!/)', rf'\1="{PREFIX}', 31),
    # the manifest is fetched without credentials unless asked to: a 401 in the console behind Basic auth
    ("index.html", r'<link rel="manifest" href=', '<link rel="manifest" crossorigin="use-credentials" href=', 1),
    ("*.css", r'url\(/(?!/)', f'url({PREFIX}', 5),  # the Inter font
    ("manifest.json", r'"src": "/assets/', f'"src": "{PREFIX}assets/', 9),
    # rspack's public path, hard-coded in the app bundle and in every web worker bundle (decoders, compute,
    # histogram, interpolation, polySeg): chunks and workers would load from / instead of /ohif/
    ("*.js", r'^__webpack_require__\.p = "/";$', f'__webpack_require__.p = "{PREFIX}";', 8),
    ("app.bundle.*.js", r"browserImportFunction\('/dicom-microscopy-viewer/",
     f"browserImportFunction('{PREFIX}dicom-microscopy-viewer/", 1),
]

OUR_FILES = {  # source (relative to viewer_extension/) -> destination (relative to the installed dist)
    "app-config.js": "app-config.js",
    "ai-ext": "ai-ext",
}
STAMP = ".orthanc-ai-viewer.json"


class InstallError(RuntimeError):
    pass


def tarball_name() -> str:
    return f"{OHIF_PACKAGE.lstrip('@').replace('/', '-')}-{OHIF_VERSION}.tgz"


def integrity_of(path: Path) -> str:
    digest = hashlib.sha512()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def fetch_tarball(cache: Path, tarball: Path | None) -> Path:
    """The pinned tarball: given, cached, or fetched once with ``npm pack``; always integrity-checked."""
    target = tarball or cache / tarball_name()
    if not target.exists():
        if tarball:
            raise InstallError(f"{tarball} does not exist")
        npm = shutil.which("npm")
        if not npm:
            raise InstallError(f"npm is needed once to fetch {OHIF_PACKAGE}@{OHIF_VERSION} "
                               f"(or pass --tarball with the file from `npm pack {OHIF_PACKAGE}@{OHIF_VERSION}`)")
        cache.mkdir(parents=True, exist_ok=True)
        print(f"viewer: fetching {OHIF_PACKAGE}@{OHIF_VERSION} with npm pack (about 50 MB, once)", flush=True)
        result = subprocess.run([npm, "pack", f"{OHIF_PACKAGE}@{OHIF_VERSION}", "--pack-destination", str(cache),
                                 "--silent"], capture_output=True, text=True)
        if result.returncode != 0 or not target.exists():
            raise InstallError(f"npm pack {OHIF_PACKAGE}@{OHIF_VERSION} failed:\n{result.stderr[-2000:]}")
    found = integrity_of(target)
    if found != OHIF_INTEGRITY:
        raise InstallError(f"{target} has integrity {found}, expected {OHIF_INTEGRITY}: delete it and retry")
    return target


def apply_patches(dist: Path) -> list[str]:
    """Apply PATCHES in place; the patched files' paths relative to ``dist`` (their names keep the hash
    of the original content, so the server must not let browsers cache them as immutable)."""
    patched_files: set[str] = set()
    for pattern, regex, replacement, expected in PATCHES:
        total, changed = 0, []
        for path in sorted(dist.glob(pattern)):
            text = path.read_text(encoding="utf-8")
            patched, count = re.subn(regex, replacement, text, flags=re.MULTILINE)
            if count:
                total += count
                changed.append((path, patched))
        if total != expected:
            raise InstallError(f"sub-path patch {regex!r} matched {total} time(s) in {pattern}, expected "
                               f"{expected}: OHIF {OHIF_VERSION} layout changed; re-check ../shared/research/OHIF.md §4")
        for path, patched in changed:
            path.write_text(patched, encoding="utf-8")
            patched_files.add(path.relative_to(dist).as_posix())
    return sorted(patched_files)


def unpack(tgz: Path, dest: Path) -> None:
    """Unpack ``package/dist`` into ``dest`` (a new folder), without source maps."""
    with tarfile.open(tgz, "r:gz") as tar:
        members = []
        for member in tar.getmembers():
            if not member.name.startswith("package/dist/") or member.name.endswith(".map"):
                continue
            if not (member.isfile() or member.isdir()):
                continue  # no links or devices from a tarball
            member.name = member.name[len("package/dist/"):]
            if not member.name or member.name.startswith("/") or ".." in Path(member.name).parts:
                continue
            members.append(member)
        if hasattr(tarfile, "data_filter"):  # Python ≥ 3.11.4; the members are already vetted above
            tar.extractall(dest, members=members, filter="data")
        else:
            tar.extractall(dest, members=members)


def stamp_expected(integrity: str) -> dict:
    return {"package": OHIF_PACKAGE, "version": OHIF_VERSION, "integrity": integrity, "prefix": PREFIX,
            "patch_set": PATCH_SET}


def installed_stamp(dest: Path) -> dict | None:
    """What the stamp of an install in ``dest`` pins (without the list of patched files), or None."""
    try:
        stamp = json.loads((dest / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return {k: v for k, v in stamp.items() if k != "patched_files"} if isinstance(stamp, dict) else None


def install_dist(dest: Path, cache: Path, tarball: Path | None) -> bool:
    """Install the patched dist into ``dest`` unless it is already there. True when work was done."""
    if installed_stamp(dest) == stamp_expected(OHIF_INTEGRITY):
        return False
    tgz = fetch_tarball(cache, tarball)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".ohif-install-", dir=dest.parent))
    try:
        unpack(tgz, work)
        patched = apply_patches(work)
        (work / "app-config.js").unlink(missing_ok=True)  # OHIF's default config; ours is installed below
        stamp = {**stamp_expected(integrity_of(tgz)), "patched_files": patched}
        (work / STAMP).write_text(json.dumps(stamp, indent=2))
        old = dest.with_name(dest.name + ".old")
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
        work.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    print(f"viewer: installed OHIF {OHIF_VERSION} (patched for {PREFIX}) into {dest}", flush=True)
    return True


def _sync_file(src: Path, dst: Path) -> bool:
    if dst.exists() and dst.read_bytes() == src.read_bytes():
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return True


def sync_our_files(dest: Path, source: Path = HERE) -> int:
    """Copy our app-config and extension modules beside the dist; remove ones we no longer ship."""
    changed = 0
    for src_name, dst_name in OUR_FILES.items():
        src, dst = source / src_name, dest / dst_name
        if src.is_file():
            changed += _sync_file(src, dst)
            continue
        wanted = {p.relative_to(src) for p in src.rglob("*") if p.is_file() and not p.name.startswith(".")}
        for rel in sorted(wanted):
            changed += _sync_file(src / rel, dst / rel)
        if dst.is_dir():
            for stale in [p for p in dst.rglob("*") if p.is_file() and p.relative_to(dst) not in wanted]:
                stale.unlink()
                changed += 1
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=REPO / "build" / "ohif", help="installed viewer folder")
    parser.add_argument("--cache", type=Path, default=REPO / "build" / "cache", help="where the tarball is kept")
    parser.add_argument("--tarball", type=Path, help="use this @ohif/app tarball instead of fetching it")
    parser.add_argument("--sync-only", action="store_true",
                        help="only copy our files into an existing install (no fetch, no unpack)")
    args = parser.parse_args(argv)
    try:
        if args.sync_only:
            if installed_stamp(args.dest) is None:
                raise InstallError(f"no viewer installed in {args.dest}: run `make viewer`")
        else:
            install_dist(args.dest, args.cache, args.tarball)
        changed = sync_our_files(args.dest)
    except InstallError as exc:
        print(f"viewer: {exc}", file=sys.stderr)
        return 1
    if changed:
        print(f"viewer: {changed} file(s) of the AI extension updated in {args.dest}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
