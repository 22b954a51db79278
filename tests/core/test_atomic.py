import json
import os

import numpy as np
import pandas as pd
import pytest

from core import atomic


def test_write_json_and_text_round_trip(tmp_path):
    atomic.write_json(tmp_path / "a" / "b.json", {"x": 1})
    assert json.loads((tmp_path / "a" / "b.json").read_text()) == {"x": 1}
    atomic.write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    dest = tmp_path / "data.bin"
    atomic.write_bytes(dest, b"old")
    with pytest.raises(RuntimeError), atomic.atomic_write(dest, "wb") as f:
        f.write(b"new partial")
        raise RuntimeError("crash mid-write")
    assert dest.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["data.bin"]


def test_partial_file_never_visible_under_final_name(tmp_path):
    dest = tmp_path / "x.bin"
    with atomic.atomic_write(dest, "wb") as f:
        f.write(b"abc")
        assert not dest.exists()
        tmps = [p for p in tmp_path.iterdir() if atomic.is_temp_path(p)]
        assert len(tmps) == 1
    assert dest.read_bytes() == b"abc"


def test_atomic_path_for_libraries(tmp_path):
    dest = tmp_path / "arr.npy"
    atomic.save_npy(dest, np.arange(5, dtype=np.float16))
    assert np.load(dest).tolist() == [0, 1, 2, 3, 4]
    atomic.write_parquet(tmp_path / "t.parquet", pd.DataFrame({"id": ["a", "b"]}))
    assert pd.read_parquet(tmp_path / "t.parquet")["id"].tolist() == ["a", "b"]
    with pytest.raises(FileNotFoundError), atomic.atomic_path(tmp_path / "never.bin"):
        pass
    assert not (tmp_path / "never.bin").exists()


def test_clean_temp_files(tmp_path):
    (tmp_path / "sub").mkdir()
    leftover = atomic.temp_path_for(tmp_path / "sub" / "f.npy")
    leftover.write_bytes(b"junk")
    (tmp_path / "sub" / "keep.npy").write_bytes(b"ok")
    assert atomic.clean_temp_files(tmp_path) == 1
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["keep.npy"]


def test_atomic_write_refuses_read_mode(tmp_path):
    with pytest.raises(ValueError), atomic.atomic_write(tmp_path / "f", "rb"):
        pass
