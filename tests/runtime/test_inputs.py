"""runtime/inputs.py: the one resource policy for user input (regular files, sizes, JSON)."""

from __future__ import annotations

import json
import os
import threading

import pytest

from dsvc.runtime import inputs
from dsvc.runtime.inputs import InputError


def test_regular_file_within_the_limit_is_read(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b'\xef\xbb\xbf{"x": [1, 2.5, "y"]}')
    assert inputs.read_text(path, 100) == '{"x": [1, 2.5, "y"]}'
    assert inputs.load_json(path) == {"x": [1, 2.5, "y"]}


@pytest.mark.parametrize("size", [101, 10_000])
def test_size_is_refused_before_reading(tmp_path, size):
    path = tmp_path / "big"
    path.write_bytes(b"x" * size)
    with pytest.raises(InputError, match=rf"{size} bytes, over the 100-byte limit"):
        inputs.read_bytes(path, 100)


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.dsv"
    os.mkfifo(fifo)
    result = []
    reader = threading.Thread(target=lambda: result.append(_error(fifo)), daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert "FIFO" in result[0] and "regular files only" in result[0]


def _error(path) -> str:
    try:
        inputs.read_bytes(path, 100)
    except InputError as err:
        return str(err)
    return "read"


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/null"])
def test_devices_and_symlinks_to_them_are_refused(tmp_path, target):
    if not os.path.exists(target):
        pytest.skip(f"no {target}")
    link = tmp_path / "spec.dsv"
    link.symlink_to(target)
    for path in (target, link):
        assert "is a device; dsvc reads regular files only" in _error(path)


def test_directory_missing_file_and_dangling_symlink(tmp_path):
    assert "is a directory" in _error(tmp_path)
    assert _error(tmp_path / "nope").endswith("nope: no such file")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    assert "a symlink to" in _error(dangling) and "does not exist" in _error(dangling)


def test_undecodable_text_names_the_byte(tmp_path):
    path = tmp_path / "bin"
    path.write_bytes(b"ok\xff\xfe")
    with pytest.raises(InputError, match=r"not UTF-8 text \(byte 2\)"):
        inputs.read_text(path, 100)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "JSON nested 100000 deep, over the limit of 64"),
        ('{"n": ' + "9" * 5000 + "}", "a JSON integer of 5000 digits"),
        ('{"n": -' + "9" * 65 + "}", "a JSON integer of 65 digits"),
        ('{"n": 1e999}', "JSON number 1e999 is not finite"),
        ('{"n": -Infinity}', "JSON -Infinity is not a number"),
        ('{"n": NaN}', "JSON NaN is not a number"),
        ('{"n": }', "not valid JSON at line 1, column 7"),
    ],
)
def test_json_limits(text, message):
    with pytest.raises(InputError, match=message):
        inputs.parse_json(text, "cfg.json")


def test_depth_counts_brackets_outside_strings_only():
    deep_inside_strings = json.dumps({"s": ["[" * 200, "{" * 200]} | {f"k{i}": [i] for i in range(80)})
    assert inputs.parse_json(deep_inside_strings, "x")["s"][0] == "[" * 200
    at_limit = "[" * inputs.MAX_JSON_DEPTH + "]" * inputs.MAX_JSON_DEPTH
    assert inputs.parse_json(at_limit, "x") is not None
    with pytest.raises(InputError, match="nested 65 deep"):
        inputs.parse_json("[" + at_limit + "]", "x")


def test_writable_directories_are_probed_without_a_trace(tmp_path):
    (tmp_path / "afile").write_text("x")
    inputs.check_writable_dir(tmp_path / "new" / "run")  # creatable: fine
    inputs.check_writable_dir(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["afile"]  # the probe is gone, nothing created
    with pytest.raises(InputError, match="afile' is a file, not a directory"):
        inputs.check_writable_dir(tmp_path / "afile" / "run")
    with pytest.raises(InputError, match="it is a file, not a directory"):
        inputs.check_writable_dir(tmp_path / "afile")
    if os.path.isdir("/proc/self"):
        with pytest.raises(InputError, match="cannot create files in '/proc"):
            inputs.check_writable_dir("/proc/self/run")


def test_json_syntax_errors_carry_their_position():
    with pytest.raises(InputError) as info:
        inputs.parse_json('{"a": [1,\n  oops]}', "x.json")
    assert (info.value.line, info.value.col) == (2, 3)
    with pytest.raises(InputError) as info:
        inputs.parse_json("[" * 100 + "]" * 100, "x.json")
    assert info.value.line is None  # a limit, not a place in the text
