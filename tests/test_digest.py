import math

import numpy as np

from seglab.digest import json_safe, sha256_file, sha256_files, sha256_json


def test_sha256_file_matches_hashlib(tmp_path):
    import hashlib

    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 9000  # more than one read block
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_sha256_files_depends_on_names_order_and_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    base = sha256_files([a, b])
    assert base == sha256_files([a, b])
    assert base != sha256_files([b, a])
    b.write_bytes(b"twO")
    assert base != sha256_files([a, b])


def test_sha256_json_ignores_key_order():
    assert sha256_json({"a": 1, "b": [1, 2]}) == sha256_json({"b": [1, 2], "a": 1})
    assert sha256_json({"a": 1}) != sha256_json({"a": 2})


def test_json_safe_converts_numpy_and_non_finite():
    value = {"f": np.float32(0.5), "i": np.int64(3), "b": np.bool_(True), "nan": float("nan"),
             "inf": np.float64(math.inf), "arr": np.array([1.0, np.nan]), "scalar": np.array(2.0),
             "nested": [(np.int8(1), None, "x")]}
    assert json_safe(value) == {"f": 0.5, "i": 3, "b": True, "nan": None, "inf": None, "arr": [1.0, None],
                                "scalar": 2.0, "nested": [[1, None, "x"]]}
    assert type(json_safe(np.int64(3))) is int
