"""Loading the agent's TOML config file: read, parse, validate, and explain every problem.

``load_config(path)`` is what ``edge-agent run`` uses: no path and no file at the default
location means the embedded defaults (``agent.defaults.default_config()``); a named file that is
missing or unreadable is a ``ConfigFileError``; a file that does not validate is a
``ConfigValidationError`` whose problems each name the dotted key path and the TOML line.

``check_config_file(path)`` is what ``edge-agent config validate`` uses: it collects every
problem (syntax, schema, pinning against the allowed CPU set) instead of stopping at the first.

TOML parsers keep no positions, so ``key_lines(text)`` is a small scanner that maps each key
path (tables, arrays of tables with their indices, dotted keys, inline tables, array elements)
to the line it appears on.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from agent.config import DEFAULT_CONFIG_PATH, AgentConfig
from agent.defaults import default_config
from agent.errors import ConfigFileError, ConfigValidationError, PinningError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "ConfigProblem",
    "KeyPath",
    "check_config_file",
    "format_key_path",
    "key_lines",
    "load_config",
    "parse_config_text",
    "resolve_config_path",
]

KeyPath = tuple[str | int, ...]
"""A key path: table/key names and array indices, e.g. ``("pipelines", 0, "engine")``."""


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a config file: where (key path, line) and what is wrong."""

    path: KeyPath
    line: int | None
    message: str

    def format(self, source: str | None = None) -> str:
        """``source:line: key.path: message`` (parts that are unknown are left out)."""
        if source is not None:
            prefix = f"{source}:{self.line}" if self.line else source
        else:
            prefix = f"line {self.line}" if self.line else ""
        key = format_key_path(self.path)
        parts = [p for p in (prefix, key) if p]
        return ": ".join([*parts, self.message])


def format_key_path(path: Sequence[str | int]) -> str:
    """``("pipelines", 0, "engine", "providers", 1)`` -> ``pipelines[0].engine.providers[1]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = part if _is_bare_key(part) else f'"{part}"'
            out += f".{name}" if out else name
    return out


def _is_bare_key(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "_-" for c in name)


# --------------------------------------------------------------------------------------------
# Loading


def load_config(path: Path | None, *, default_path: Path | None = None) -> AgentConfig:
    """The config to run with.

    ``path`` given: that file, which must exist and validate. ``path`` None: ``default_path``
    (``DEFAULT_CONFIG_PATH``, /etc/edge-agent/agent.toml) if it exists, else the embedded
    defaults (``agent.defaults.default_config()``).
    """
    resolved = resolve_config_path(path, default_path=default_path)
    if resolved is None:
        return default_config()
    text = _read_text(resolved)
    config, problems = parse_config_text(text)
    if config is None:
        raise ConfigValidationError(str(resolved), [p.format() for p in problems])
    return config


def resolve_config_path(path: Path | None, *, default_path: Path | None = None) -> Path | None:
    """The config file ``load_config(path)`` reads: ``path`` when given, else ``default_path``
    (``DEFAULT_CONFIG_PATH``) if it exists; None means the embedded defaults."""
    if path is not None:
        return path
    default = DEFAULT_CONFIG_PATH if default_path is None else default_path
    return default if default.exists() else None


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigFileError(
            f"config file {path} does not exist — create it (see deploy/agent.example.toml) "
            "or leave out --config to run on the embedded defaults"
        ) from exc
    except IsADirectoryError as exc:
        raise ConfigFileError(f"config file {path} is a directory — name a TOML file") from exc
    except OSError as exc:
        raise ConfigFileError(
            f"config file {path} cannot be read: {exc.strerror} — make it readable by the "
            "agent's user"
        ) from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigFileError(
            f"config file {path} is not UTF-8 text (byte {exc.start}) — save it as UTF-8"
        ) from exc


def parse_config_text(text: str) -> tuple[AgentConfig | None, list[ConfigProblem]]:
    """Parse and validate TOML text: the config (None if invalid) and every schema problem.

    A TOML syntax error is a single problem (the parser stops there).
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return None, [_syntax_problem(exc)]
    try:
        config = AgentConfig.model_validate(data)
    except ValidationError as exc:
        return None, _problems_from_validation(exc, data, key_lines(text))
    return config, []


def _syntax_problem(exc: ValueError) -> ConfigProblem:
    # Python >= 3.14 has .lineno/.msg; older parsers put "(at line L, column C)" in the text.
    text = str(exc)
    line: int | None = getattr(exc, "lineno", None)
    match = re.search(r"\(at line (\d+), column (\d+)\)", text)
    if line is None and match:
        line = int(match.group(1))
    message = getattr(exc, "msg", None) or re.sub(r"\s*\(at line \d+, column \d+\)", "", text)
    if match:
        message += f" (column {match.group(2)})"
    return ConfigProblem((), line, f"TOML syntax error: {message} — fix the TOML syntax")


def check_config_file(path: Path) -> list[ConfigProblem]:
    """Every problem of the config file at ``path`` (empty list: valid). Never raises for bad
    content; an unreadable file is one problem."""
    try:
        text = _read_text(path)
    except ConfigFileError as exc:
        return [ConfigProblem((), None, str(exc))]
    config, problems = parse_config_text(text)
    if config is None:
        return problems
    return _pinning_problems(config, text)


def _pinning_problems(config: AgentConfig, text: str) -> list[ConfigProblem]:
    from agent.pinning import pinning_problems  # noqa: PLC0415 - heavy /sys reads only when asked

    try:
        errors = pinning_problems(config.pinning)
    except PinningError as exc:  # unreadable NUMA topology: no plan can be checked
        errors = [exc]
    if not errors:
        return []
    lines = key_lines(text)
    problems: list[ConfigProblem] = []
    for error in errors:
        path: KeyPath = tuple(error.key.split(".")) if error.key else ("pinning",)
        problems.append(ConfigProblem(path, _line_for(path, lines), error.detail))
    return problems


# --------------------------------------------------------------------------------------------
# pydantic errors -> problems


def _problems_from_validation(
    exc: ValidationError, data: Mapping[str, Any], lines: Mapping[KeyPath, int]
) -> list[ConfigProblem]:
    grouped: dict[KeyPath, list[str]] = {}
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        path = _data_path(loc, data, err["type"])
        message = _message(err, loc)
        messages = grouped.setdefault(path, [])
        if message not in messages:
            messages.append(message)
    problems = [
        ConfigProblem(path, _line_for(path, lines), "; or ".join(messages))
        for path, messages in grouped.items()
    ]
    return sorted(problems, key=lambda p: p.line if p.line is not None else 0)


def _data_path(loc: tuple[str | int, ...], data: Any, err_type: str) -> KeyPath:
    """The key path in the file for a pydantic ``loc``: union labels and tags dropped."""
    path: list[str | int] = []
    node: Any = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        in_mapping = isinstance(node, Mapping) and isinstance(part, str) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if in_mapping or in_list:
            path.append(part)
            node = node[part]
        elif last and err_type == "missing":
            path.append(part)
        # else: a union member label or discriminator tag, not a key of the file
    return tuple(path)


def _message(err: Mapping[str, Any], loc: tuple[str | int, ...]) -> str:
    err_type = err["type"]
    if err_type == "extra_forbidden":
        known = _known_keys(loc[:-1])
        hint = ""
        if known:
            close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
            hint = (
                f" — did you mean '{close[0]}'?"
                if close
                else " — known keys: " + ", ".join(sorted(known))
            )
        return f"unknown key{hint}"
    if err_type == "missing":
        return "required key is missing"
    if err_type == "union_tag_invalid":
        ctx = err.get("ctx", {})
        return f"unknown type {ctx.get('tag')!r} — expected one of {ctx.get('expected_tags')}"
    if err_type == "union_tag_not_found":
        return f"a `{err.get('ctx', {}).get('discriminator', 'type')}` key is required"
    msg = str(err["msg"])
    value = err.get("input")
    if isinstance(value, (str, int, float, bool)) and not isinstance(value, Mapping):
        return f"{msg} (got {value!r})"
    return msg


def _known_keys(loc: tuple[str | int, ...]) -> list[str]:
    """Field names of the model reached by following ``loc`` from AgentConfig ([] if none)."""
    current: Any = AgentConfig
    for part in loc:
        model = _model_for(current, part)
        if model is None:
            return []
        current = model
    models = _models_in(current)
    if len(models) == 1:
        return list(models[0].model_fields)
    return []


def _model_for(annotation: Any, part: str | int) -> Any:
    """Follow one loc element from ``annotation``: a field, an index, or a union label/tag."""
    for model in _models_in(annotation):
        if isinstance(part, str) and part in model.model_fields:
            return model.model_fields[part].annotation
    if isinstance(part, int):
        for arg in _union_args(annotation):
            if typing.get_origin(arg) in (list, tuple, Sequence):
                args = typing.get_args(arg)
                return args[0] if args else None
        return None
    for model in _models_in(annotation):
        tag = model.model_fields.get("type")
        if tag is not None and part in typing.get_args(tag.annotation):
            return model
        if model.__name__ == part:
            return model
    return None


def _union_args(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        out: list[Any] = []
        for arg in typing.get_args(annotation):
            out.extend(_union_args(arg))
        return out
    return [annotation]


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    return [a for a in _union_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]


def _line_for(path: KeyPath, lines: Mapping[KeyPath, int]) -> int | None:
    """The line of ``path``, else of its nearest ancestor that appears in the file."""
    for end in range(len(path), 0, -1):
        line = lines.get(tuple(path[:end]))
        if line is not None:
            return line
    return None


# --------------------------------------------------------------------------------------------
# Line scanner


def key_lines(text: str) -> dict[KeyPath, int]:
    """Map every key path in TOML ``text`` to the (1-based) line where it first appears.

    Covers ``[table]`` and ``[[array.of.tables]]`` headers (indices counted per array),
    dotted and quoted keys, inline tables and array elements. Meant for well-formed TOML (call
    it after the parser accepted the text); on malformed input it returns what it found.
    """
    scanner = _Scanner(text)
    # malformed input: keep what was mapped so far; the TOML parser reports the syntax error
    with contextlib.suppress(_ScanError):
        scanner.document()
    return scanner.lines


class _ScanError(Exception):
    pass


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1
        self.lines: dict[KeyPath, int] = {}
        self.table: KeyPath = ()
        # arrays of tables: unindexed resolved path -> index of their current element
        self.aot_index: dict[KeyPath, int] = {}

    # -- low level
    def peek(self, n: int = 1) -> str:
        return self.text[self.pos : self.pos + n]

    def advance(self, n: int = 1) -> None:
        chunk = self.text[self.pos : self.pos + n]
        self.line += chunk.count("\n")
        self.pos += n

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def skip_inline_space(self) -> None:
        while self.peek() in (" ", "\t") and not self.at_end():
            self.advance()

    def skip_comment(self) -> None:
        if self.peek() == "#":
            end = self.text.find("\n", self.pos)
            self.advance((len(self.text) if end < 0 else end) - self.pos)

    def skip_space_newlines_comments(self) -> None:
        while not self.at_end():
            c = self.peek()
            if c in " \t\r\n":
                self.advance()
            elif c == "#":
                self.skip_comment()
            else:
                return

    def record(self, path: KeyPath, line: int) -> None:
        self.lines.setdefault(path, line)

    # -- grammar
    def document(self) -> None:
        while True:
            self.skip_space_newlines_comments()
            if self.at_end():
                return
            if self.peek(2) == "[[":
                self.array_table_header()
            elif self.peek() == "[":
                self.table_header()
            else:
                self.key_value(self.table)
            self.skip_inline_space()
            self.skip_comment()

    def resolve(self, keys: list[str]) -> list[str | int]:
        """Insert the current element index after every array-of-tables prefix."""
        resolved: list[str | int] = []
        plain: list[str] = []
        for key in keys:
            plain.append(key)
            resolved.append(key)
            index = self.aot_index.get(tuple(plain))
            if index is not None:
                resolved.append(index)
        return resolved

    def table_header(self) -> None:
        line = self.line
        self.advance()  # [
        keys = self.key()
        self.skip_inline_space()
        if self.peek() != "]":
            raise _ScanError
        self.advance()
        resolved = self.resolve(keys)
        self.record_prefixes(tuple(resolved), line)
        self.table = tuple(resolved)

    def array_table_header(self) -> None:
        line = self.line
        self.advance(2)  # [[
        keys = self.key()
        self.skip_inline_space()
        if self.peek(2) != "]]":
            raise _ScanError
        self.advance(2)
        parent = self.resolve(keys[:-1])
        plain = tuple(keys)
        index = self.aot_index.get(plain, -1) + 1
        # a new element of an outer array resets the nested arrays under it
        self.aot_index = {k: v for k, v in self.aot_index.items() if k[: len(plain)] != plain}
        self.aot_index[plain] = index
        base = (*parent, keys[-1])
        self.record_prefixes(base, line)
        self.table = (*base, index)
        self.record(self.table, line)

    def record_prefixes(self, path: KeyPath, line: int) -> None:
        for end in range(1, len(path) + 1):
            self.record(tuple(path[:end]), line)

    def key_value(self, base: KeyPath) -> None:
        line = self.line
        keys = self.key()
        self.skip_inline_space()
        if self.peek() != "=":
            raise _ScanError
        self.advance()
        self.skip_inline_space()
        path = (*base, *keys)
        for end in range(len(base) + 1, len(path) + 1):
            self.record(tuple(path[:end]), line)
        self.value(path)

    def key(self) -> list[str]:
        keys: list[str] = []
        while True:
            self.skip_inline_space()
            c = self.peek()
            if c == '"':
                keys.append(self.basic_string())
            elif c == "'":
                keys.append(self.literal_string())
            else:
                start = self.pos
                while not self.at_end() and (self.peek().isalnum() or self.peek() in "_-"):
                    self.advance()
                if self.pos == start:
                    raise _ScanError
                keys.append(self.text[start : self.pos])
            self.skip_inline_space()
            if self.peek() != ".":
                return keys
            self.advance()

    def value(self, path: KeyPath) -> None:
        c = self.peek()
        if c == "{":
            self.inline_table(path)
        elif c == "[":
            self.array(path)
        elif self.peek(3) in ('"""', "'''"):
            self.multiline_string(self.peek(3))
        elif c == '"':
            self.basic_string()
        elif c == "'":
            self.literal_string()
        else:
            start = self.pos
            while not self.at_end() and self.peek() not in ",]}#\n\r":
                self.advance()
            if self.pos == start:
                raise _ScanError

    def inline_table(self, path: KeyPath) -> None:
        self.advance()  # {
        self.skip_inline_space()
        if self.peek() == "}":
            self.advance()
            return
        while True:
            self.skip_space_newlines_comments()  # TOML 1.1 allows newlines; be lenient
            self.key_value(path)
            self.skip_space_newlines_comments()
            c = self.peek()
            self.advance()
            if c == "}":
                return
            if c != ",":
                raise _ScanError
            self.skip_space_newlines_comments()
            if self.peek() == "}":
                self.advance()
                return

    def array(self, path: KeyPath) -> None:
        self.advance()  # [
        index = 0
        while True:
            self.skip_space_newlines_comments()
            if self.peek() == "]":
                self.advance()
                return
            element = (*path, index)
            self.record(element, self.line)
            self.value(element)
            index += 1
            self.skip_space_newlines_comments()
            c = self.peek()
            self.advance()
            if c == "]":
                return
            if c != ",":
                raise _ScanError

    def basic_string(self) -> str:
        self.advance()  # "
        out: list[str] = []
        while not self.at_end():
            c = self.peek()
            if c == "\\":
                out.append(self.peek(2))
                self.advance(2)
            elif c == '"':
                self.advance()
                return "".join(out)
            elif c == "\n":
                raise _ScanError
            else:
                out.append(c)
                self.advance()
        raise _ScanError

    def literal_string(self) -> str:
        self.advance()  # '
        end = self.text.find("'", self.pos)
        newline = self.text.find("\n", self.pos)
        if end < 0 or 0 <= newline < end:
            raise _ScanError
        value = self.text[self.pos : end]
        self.advance(end + 1 - self.pos)
        return value

    def multiline_string(self, quote: str) -> None:
        self.advance(3)
        while not self.at_end():
            if quote == '"""' and self.peek() == "\\":
                self.advance(2)
            elif self.peek(3) == quote:
                self.advance(3)
                while self.peek() == quote[0]:  # up to two quotes may end the content
                    self.advance()
                return
            else:
                self.advance()
        raise _ScanError
