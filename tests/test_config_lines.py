"""The TOML key-path -> line scanner behind `edge-agent config validate`."""

from __future__ import annotations

import sys

import pytest

from agent.configfile import format_key_path, key_lines

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def lines_of(text: str) -> dict[str, int]:
    tomllib.loads(text)  # every sample is valid TOML
    return {format_key_path(k): v for k, v in key_lines(text).items()}


def test_tables_dotted_and_quoted_keys() -> None:
    text = """\
# comment
top = 1
a.b.c = "x"   # trailing comment

[pinning]
"quoted key" = 2
'literal.key' = 3
[pinning.stages]
capture = "0"
"""
    assert lines_of(text) == {
        "top": 2,
        "a": 3,
        "a.b": 3,
        "a.b.c": 3,
        "pinning": 5,
        'pinning."quoted key"': 6,
        'pinning."literal.key"': 7,
        "pinning.stages": 8,
        "pinning.stages.capture": 9,
    }


def test_arrays_of_tables_count_indices_and_subtables_attach_to_last() -> None:
    text = """\
[[pipelines]]
name = "a"
[pipelines.engine]
type = "onnxruntime"
[[pipelines.sources]]
path = "x"
[[pipelines.sources]]
path = "y"

[[pipelines]]
name = "b"
[[pipelines.sources]]
path = "z"
"""
    got = lines_of(text)
    assert got["pipelines[0]"] == 1
    assert got["pipelines[0].name"] == 2
    assert got["pipelines[0].engine"] == 3
    assert got["pipelines[0].engine.type"] == 4
    assert got["pipelines[0].sources[0]"] == 5
    assert got["pipelines[0].sources[0].path"] == 6
    assert got["pipelines[0].sources[1].path"] == 8
    assert got["pipelines[1]"] == 10
    assert got["pipelines[1].name"] == 11
    # the nested array restarts at 0 under the second pipeline
    assert got["pipelines[1].sources[0].path"] == 13
    assert "pipelines[1].sources[1]" not in got


def test_inline_tables_and_arrays_spanning_lines() -> None:
    text = """\
engine = { type = "onnxruntime", providers = ["A", "B"] }
list = [
  1,   # one
  [2, 3],
  { k = "v" },
]
empty = []
nested = { inner = { deep = 1 } }
"""
    got = lines_of(text)
    assert got["engine.type"] == 1
    assert got["engine.providers[1]"] == 1
    assert got["list"] == 2
    assert got["list[0]"] == 3
    assert got["list[1]"] == 4
    assert got["list[1][1]"] == 4
    assert got["list[2].k"] == 5
    assert got["empty"] == 7
    assert got["nested.inner.deep"] == 8


def test_strings_that_look_like_syntax_are_skipped() -> None:
    text = '''\
a = "has [brackets] and # hash and \\" quote"
b = """
multi = line
[not.a.table]
"""
c = \'\'\'
x = 1 \'\'\'
d = 'single # not comment'
e = 1
'''
    assert lines_of(text) == {"a": 1, "b": 2, "c": 6, "d": 8, "e": 9}


def test_array_tables_inside_inline_array_of_tables() -> None:
    text = 'pipelines = [\n  { name = "a" },\n  { name = "b", sources = [{ path = "p" }] },\n]\n'
    got = lines_of(text)
    assert got["pipelines[0].name"] == 2
    assert got["pipelines[1].sources[0].path"] == 3


@pytest.mark.parametrize("text", ['a = "unterminated\n', "[table\n", "= 1\n", "k = [1, 2\n"])
def test_malformed_input_keeps_what_was_found(text: str) -> None:
    got = key_lines("first = 1\n" + text)
    assert got[("first",)] == 1
