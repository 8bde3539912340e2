"""Shard manifests: the proof that a split's part files are complete and unchanged.

`<split>/manifest.json` lists every part file with its rows, size and sha256. `ShardWriter`
(seglab.data.shards) writes it once, when it closes, inside the same atomic folder as the parts;
`shard_files` checks a split against it, and every reader lists a split's files through it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq

from seglab.atomic import write_text_atomic
from seglab.digest import sha256_file

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "seglab.shard_manifest/1"


def manifest_entry(path: Path, rows: int) -> dict:
    """One part file as the manifest lists it."""
    return {"file": path.name, "rows": rows, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest_entries(split_dir: Path, entries: list[dict]) -> dict:
    """Write `entries` (from `manifest_entry`) as `split_dir`'s manifest, atomically."""
    manifest = {"format": MANIFEST_FORMAT, "rows": sum(e["rows"] for e in entries), "files": entries}
    write_text_atomic(split_dir / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return manifest


def write_manifest(split_dir: str | Path) -> dict:
    """Record the part files now in `split_dir` as its manifest and return it. Only for parts put
    together without `ShardWriter` (which writes its own): whatever is there now is what readers
    will accept from then on."""
    split_dir = Path(split_dir)
    entries = [manifest_entry(path, pq.ParquetFile(path).metadata.num_rows)
               for path in sorted(split_dir.glob("part-*.parquet"))]
    return write_manifest_entries(split_dir, entries)


class ShardIntegrityError(ValueError):
    """A split's part files disagree with its manifest (missing, extra or changed), or it has none."""


# (path, device, inode, size, mtime, ctime) -> sha256, so a process hashes an unchanged file once.
_HASHED: dict[tuple, str] = {}


def _sha256_once(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _HASHED:
        return _HASHED[key]
    digest = sha256_file(path)
    # File times are coarse (a clock tick): only a file unchanged for a while has a key that any
    # later write is sure to change.
    if time.time_ns() - st.st_ctime_ns > 1_000_000_000:
        _HASHED[key] = digest
    return digest


def shard_files(shard_dir: str | Path, split: str) -> list[Path]:
    """The part files of `<shard_dir>/<split>`, checked against its manifest: every listed file is
    there with its recorded size and sha256, and no other. The one way readers list a split's files.

    Raises FileNotFoundError when the split has no shards at all, `ShardIntegrityError` (naming the
    split and the file) when the files are incomplete, extra or changed, or have no manifest.
    """
    folder = Path(shard_dir) / split
    parts = sorted(folder.glob("part-*.parquet"))
    manifest_path = folder / MANIFEST_FILE
    rebuild = f"rebuild them (`dvc repro shard`, or the stage that wrote {Path(shard_dir)})"
    if not manifest_path.is_file():
        if not parts:
            raise FileNotFoundError(f"{folder}: no shards (part-*.parquet); run `dvc repro shard`")
        raise ShardIntegrityError(
            f"split '{split}' of {shard_dir}: no {MANIFEST_FILE} beside its {len(parts)} part file(s), so "
            f"nothing proves they are complete and unchanged (shards written before seglab recorded "
            f"manifests, or not by its ShardWriter); {rebuild}")
    try:
        manifest = json.loads(manifest_path.read_text())
        listed = {entry["file"]: entry for entry in manifest["files"]}
    except (ValueError, KeyError, TypeError) as e:
        raise ShardIntegrityError(f"{manifest_path}: unreadable shard manifest ({type(e).__name__}: {e}); "
                                  f"{rebuild}") from None
    problems = [f"{name} is missing ({listed[name].get('rows')} rows)"
                for name in sorted(listed.keys() - {p.name for p in parts})]
    for path in parts:
        entry = listed.get(path.name)
        if entry is None:
            problems.append(f"{path.name} is not in the manifest")
        elif path.stat().st_size != entry.get("bytes") or _sha256_once(path) != entry.get("sha256"):
            problems.append(f"{path.name} changed since it was written (size or sha256 differs from the manifest)")
    if problems:
        raise ShardIntegrityError(
            f"split '{split}' of {shard_dir}: {'; '.join(problems)} ({manifest_path} lists {len(listed)} "
            f"file(s), {manifest.get('rows')} rows); the split is incomplete or was modified, {rebuild}")
    if not listed:
        raise FileNotFoundError(f"{folder}: no shards (its manifest lists none); run `dvc repro shard`")
    return [folder / name for name in sorted(listed)]


def open_shard(path: str | Path) -> pq.ParquetFile:
    """A shard file for reading, its Parquet page checksums verified as pages are read."""
    return pq.ParquetFile(path, page_checksum_verification=True)
