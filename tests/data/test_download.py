"""The COCO download path, exercised offline: local archives with checksums, and a clear offline error."""

from __future__ import annotations

import zipfile

import pytest

from seglab.data.coco import COCO2017_ARCHIVES, DataError
from seglab.data.download import download_coco, fetch_archive, md5sum


@pytest.fixture
def archives(tiny_coco, tmp_path):
    """Zip the tiny COCO root the way cocodataset.org packs COCO 2017."""
    folder = tmp_path / "archives"
    folder.mkdir()
    with zipfile.ZipFile(folder / "val2017.zip", "w") as zf:
        for p in sorted((tiny_coco.root / "val2017").iterdir()):
            zf.write(p, f"val2017/{p.name}")
    with zipfile.ZipFile(folder / "annotations_trainval2017.zip", "w") as zf:
        for p in sorted((tiny_coco.root / "annotations").iterdir()):
            zf.write(p, f"annotations/{p.name}")
    table = {name: (url, md5sum(folder / name)) if (folder / name).exists() else (url, md5)
             for name, (url, md5) in COCO2017_ARCHIVES.items()}
    return folder, table


def test_local_archives_are_checked_and_unpacked_into_a_coco_root(archives, tmp_path):
    folder, table = archives
    root = download_coco(tmp_path / "dest", parts=["annotations", "val2017"], archives_dir=folder, archives=table)
    assert (root / "annotations" / "instances_val2017.json").is_file()
    assert len(list((root / "val2017").glob("*.jpg"))) == 2
    # Idempotent: a second run replaces the folders with identical content.
    download_coco(tmp_path / "dest", parts=["val2017"], archives_dir=folder, archives=table)
    assert len(list((root / "val2017").glob("*.jpg"))) == 2


def test_checksum_mismatch_is_refused(archives, tmp_path):
    folder, _ = archives  # the official MD5s cannot match these home-made archives
    with pytest.raises(DataError, match=r"val2017.zip: MD5 [0-9a-f]{32}, expected 442b8da7639aecaf257c1dceb8ba8c80"):
        download_coco(tmp_path / "dest", parts=["val2017"], archives_dir=folder)
    assert not (tmp_path / "dest" / "val2017").exists()


def test_missing_archive_names_the_official_urls(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)train2017.zip: archive not found.*http://images.cocodataset.org/zips/train2017.zip"):
        download_coco(tmp_path / "dest", parts=["train2017"], archives_dir=tmp_path)


def test_offline_download_fails_clearly_and_leaves_nothing(tmp_path):
    # Port 9 on loopback refuses at once: the same code path as a machine without internet.
    table = {"val2017.zip": ("http://127.0.0.1:9/val2017.zip", "0" * 32)}
    with pytest.raises(ConnectionError, match=r"(?s)cannot download http://127.0.0.1:9/val2017.zip.*--archives FOLDER"):
        fetch_archive("val2017.zip", tmp_path, table)
    assert list(tmp_path.iterdir()) == []


def test_not_a_zip(tmp_path):
    (tmp_path / "val2017.zip").write_bytes(b"not a zip")
    table = {**COCO2017_ARCHIVES, "val2017.zip": ("u", md5sum(tmp_path / "val2017.zip"))}
    with pytest.raises(DataError, match="not a valid zip archive"):
        download_coco(tmp_path / "dest", parts=["val2017"], archives_dir=tmp_path, archives=table)
