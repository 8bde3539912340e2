"""The real COCO 2017 download path, for users online: official archives, MD5-checked, unpacked atomically."""

from __future__ import annotations

import hashlib
import logging
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from seglab.atomic import atomic_dir, atomic_path
from seglab.data.coco import COCO2017_ARCHIVES, DataError

log = logging.getLogger(__name__)

# Which archive holds each part of a COCO root, and the folder it unpacks to.
PARTS = {
    "annotations": ("annotations_trainval2017.zip", "annotations"),
    "val2017": ("val2017.zip", "val2017"),
    "train2017": ("train2017.zip", "train2017"),
}
_CHUNK = 1 << 20


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _offline_help(archives: dict[str, tuple[str, str]]) -> str:
    listing = "\n".join(f"  {url}  md5 {md5}" for url, md5 in archives.values())
    return (
        "Without internet: fetch these archives on a connected machine, copy them into one folder and run "
        "`seglab download-coco --archives FOLDER` (checked against the MD5s), or point data.root in params.yaml "
        "at an existing COCO root (e.g. ../shared/data/coco-mini):\n" + listing
    )


def fetch_archive(name: str, dest_dir: Path, archives: dict[str, tuple[str, str]] = COCO2017_ARCHIVES) -> Path:
    """Download one archive into dest_dir (atomically), verifying its MD5; reuse a verified copy."""
    url, md5 = archives[name]
    target = dest_dir / name
    if target.is_file() and md5sum(target) == md5:
        log.info("%s: already downloaded and verified", target)
        return target
    log.info("downloading %s", url)
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_path(target) as tmp:
            with open(tmp, "wb") as out:
                for block in iter(lambda: response.read(_CHUNK), b""):
                    digest.update(block)
                    out.write(block)
            if digest.hexdigest() != md5:
                raise DataError(f"{url}: downloaded file has MD5 {digest.hexdigest()}, expected {md5} (corrupt or changed upstream)")
    except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
        raise ConnectionError(f"cannot download {url}: {getattr(e, 'reason', e)}.\n{_offline_help(archives)}") from None
    return target


def unpack(archive: Path, folder: str, root: Path) -> Path:
    """Unpack `folder/` from a zip into root/folder, replacing it in one rename."""
    try:
        with zipfile.ZipFile(archive) as zf, atomic_dir(root / folder) as tmp:
            members = [m for m in zf.namelist() if m.startswith(f"{folder}/")]
            if not members:
                raise DataError(f"{archive}: has no '{folder}/' folder; is it the right archive?")
            staging = tmp.parent / f".{folder}.unzip"
            shutil.rmtree(staging, ignore_errors=True)
            zf.extractall(staging, members)  # zipfile drops '..' and absolute parts of member names
            for item in (staging / folder).iterdir():
                item.rename(tmp / item.name)
            shutil.rmtree(staging, ignore_errors=True)
    except zipfile.BadZipFile as e:
        raise DataError(f"{archive}: not a valid zip archive: {e}") from None
    return root / folder


def download_coco(
    dest: str | Path,
    parts: list[str] | tuple[str, ...] = ("annotations", "val2017", "train2017"),
    archives_dir: str | Path | None = None,
    archives: dict[str, tuple[str, str]] = COCO2017_ARCHIVES,
) -> Path:
    """Make `dest` a COCO 2017 root (train2017/ val2017/ annotations/) from the official archives.

    With `archives_dir`, the archives are taken from that folder (MD5-checked) instead of the network.
    """
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    for part in parts:
        if part not in PARTS:
            raise ValueError(f"unknown COCO part {part!r}; expected one of {sorted(PARTS)}")
        name, folder = PARTS[part]
        if archives_dir is not None:
            archive = Path(archives_dir) / name
            if not archive.is_file():
                raise FileNotFoundError(f"{archive}: archive not found.\n{_offline_help(archives)}")
            expected = archives[name][1]
            actual = md5sum(archive)
            if actual != expected:
                raise DataError(f"{archive}: MD5 {actual}, expected {expected} (incomplete or not the official archive)")
        else:
            archive = fetch_archive(name, root / ".downloads", archives)
        unpack(archive, folder, root)
        log.info("unpacked %s into %s", archive.name, root / folder)
    return root
