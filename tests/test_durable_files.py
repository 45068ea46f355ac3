"""Files that are never half-written."""

import json
import os
import stat

import pytest

from durable_files import JsonlAppender, atomic_write


def test_atomic_write_replaces_whole_files_with_ordinary_permissions(tmp_path):
    path = str(tmp_path / "result.json")
    atomic_write(path, lambda f: f.write(b"old"))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    with pytest.raises(RuntimeError):

        def fail_half_way(f):
            f.write(b"new, half")
            raise RuntimeError("crash")

        atomic_write(path, fail_half_way)
    with open(path, "rb") as f:
        assert f.read() == b"old"  # the old file, whole
    assert os.listdir(tmp_path) == ["result.json"]  # and no temp file left behind


def test_jsonl_appender_appends_across_reopenings(tmp_path):
    path = str(tmp_path / "out" / "samples.jsonl")
    for batch in ([{"x": "a"}], [{"x": "b"}, {"x": "ç"}]):
        appender = JsonlAppender(path)
        appender.write(batch)
        appender.close()
    with open(path, encoding="utf-8") as f:
        assert [json.loads(line)["x"] for line in f] == ["a", "b", "ç"]
