"""Every ``edge-agent`` command and sub-command teaches by example: its ``--help`` has an
``Example:``/``Examples:`` section, every example there is accepted by the real parser, and at
least one is an invocation of that very command (reaching the command's own handler). The
README's ``edge-agent`` commands are checked the same way."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli import build_parser

_SHELL_OPERATORS = frozenset({"|", ">", ">>", "<", "&&", "||", ";", "2>&1"})
_EXAMPLES_HEADER = re.compile(r"^Examples?:\s*$", re.MULTILINE)


def walk(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every parser below it (sub-commands, sub-sub-commands), once each."""
    yield parser
    for action in parser._actions:  # argparse offers no public walk
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for child in action.choices.values():
                if id(child) not in seen:  # an alias maps to the same parser
                    seen.add(id(child))
                    yield from walk(child)


def example_commands(help_text: str) -> list[list[str]]:
    """The ``edge-agent ...`` lines of the help's Example(s) section as argument lists: an
    example ends at a ``#`` comment, at two spaces (the description column) or at a shell
    operator (``| head``, ``> file``)."""
    found = _EXAMPLES_HEADER.search(help_text)
    if found is None:
        return []
    commands = []
    for raw in help_text[found.end() :].splitlines():
        line = raw.strip()
        if not line.startswith("edge-agent"):
            continue
        line = re.split(r"\s#|\s{2,}", line, maxsplit=1)[0]
        words = shlex.split(line)
        for i, word in enumerate(words):
            if word in _SHELL_OPERATORS:
                words = words[:i]
                break
        commands.append(words)
    return commands


def _all_parsers() -> list[argparse.ArgumentParser]:
    return list(walk(build_parser()))


def test_the_walk_finds_every_command() -> None:
    progs = {p.prog for p in _all_parsers()}
    # the commands every install has (more may be registered, e.g. bundles)
    for prog in (
        "edge-agent",
        "edge-agent run",
        "edge-agent config validate",
        "edge-agent config schema",
        "edge-agent info",
        "edge-agent models list",
        "edge-agent models pull",
        "edge-agent models verify",
        "edge-agent models info",
        "edge-agent models build-plan",
    ):
        assert prog in progs


def test_example_commands_cut_comments_descriptions_and_pipes() -> None:
    text = (
        "usage: x\n\nExamples:\n"
        "  edge-agent run --frames 100 | head   # stop after 100 frames\n"
        "  edge-agent info                 human-readable summary\n"
        "  edge-agent config schema > agent.schema.json\n"
        "  not an example\n"
    )
    assert example_commands(text) == [
        ["edge-agent", "run", "--frames", "100"],
        ["edge-agent", "info"],
        ["edge-agent", "config", "schema"],
    ]
    assert example_commands("usage: x\n  edge-agent run\n") == []  # no Examples section


def _parse(words: list[str]) -> argparse.Namespace | str:
    """The namespace the real parser makes of ``words`` (without the program name), or the
    parser's error text."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return build_parser().parse_args(words[1:])
    except SystemExit:
        return err.getvalue().strip().splitlines()[-1]


def _reaches(parser: argparse.ArgumentParser, words: list[str], args: argparse.Namespace) -> bool:
    """True if the example names this parser's command words in order and, for a command
    with a handler, ends in that handler."""
    names = parser.prog.split()[1:]
    rest = iter(words[1:])
    if not all(any(word == name for word in rest) for name in names):
        return False
    handler = parser.get_default("func")
    return handler is None or getattr(args, "func", None) is handler


@pytest.mark.parametrize("parser", _all_parsers(), ids=lambda p: p.prog.replace(" ", "_"))
def test_help_has_a_valid_example(parser: argparse.ArgumentParser) -> None:
    help_text = parser.format_help()
    commands = example_commands(help_text)
    assert commands, f"`{parser.prog} --help` has no 'Example:'/'Examples:' section"
    invalid, reaching = [], []
    for words in commands:
        parsed = _parse(words)
        if isinstance(parsed, str):
            invalid.append(f"{shlex.join(words)!r}: {parsed}")
        elif _reaches(parser, words, parsed):
            reaching.append(words)
    assert not invalid, f"`{parser.prog} --help` shows examples the parser rejects: {invalid}"
    assert reaching, f"`{parser.prog} --help`: no example invokes it: {commands}"


# -- the README's commands ---------------------------------------------------------------------

_README = Path(__file__).resolve().parents[1] / "README.md"
_COMMAND = re.compile(r"(?:^|[\s/])(edge-agent [^`\n]*)")


def readme_commands(text: str) -> tuple[list[list[str]], list[list[str]]]:
    """The ``edge-agent ...`` commands in ``text`` (a markdown file), cut like the help's
    examples: those in indented code blocks (to be typed), and those in inline code (which may
    wrap over lines, and may name a command without its arguments)."""
    lines = text.splitlines()
    block = [line for line in lines if line.startswith("    ")]
    prose = "\n".join(line for line in lines if not line.startswith("    "))
    prose = re.sub(r"^```.*?^```", "", prose, flags=re.MULTILINE | re.DOTALL)
    spans = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
    return _commands_in(block), _commands_in(spans)


def _commands_in(sources: list[str]) -> list[list[str]]:
    commands = []
    for source in sources:
        for found in _COMMAND.finditer(source):
            line = re.split(r"\s#|\s{2,}", found.group(1).strip(), maxsplit=1)[0]
            words = shlex.split(line)
            for i, word in enumerate(words):
                if word in _SHELL_OPERATORS:
                    words = words[:i]
                    break
            commands.append(words)
    return commands


def test_readme_commands_are_found() -> None:
    text = (
        "run `edge-agent models pull\nNAME` or `systemctl edit edge-agent`:\n\n"
        "    /opt/edge-agent/venv/bin/edge-agent info       # engines\n"
        "    libcamerify edge-agent run --config FILE | tee x\n\n"
        "```toml\nname = `edge-agent x`\n```\n"
    )
    assert readme_commands(text) == (
        [["edge-agent", "info"], ["edge-agent", "run", "--config", "FILE"]],
        [["edge-agent", "models", "pull", "NAME"]],
    )


def test_every_readme_command_is_a_valid_invocation() -> None:
    blocks, spans = readme_commands(_README.read_text(encoding="utf-8"))
    assert len(blocks) >= 3, blocks  # the README shows the CLI throughout
    assert len(spans) >= 5, spans
    problems = []
    for words, mention_ok in [*((w, False) for w in blocks), *((w, True) for w in spans)]:
        if "--help" in words or "-h" in words:
            continue  # argparse prints the help and exits 0 for any valid command path
        parsed = _parse(words)
        if isinstance(parsed, str):
            # inline prose may name a command without its arguments ("`config validate`")
            if not (mention_ok and "the following arguments are required" in parsed):
                problems.append(f"{shlex.join(words)!r}: {parsed}")
        elif getattr(parsed, "func", None) is None:
            problems.append(f"{shlex.join(words)!r} names no command")
    assert not problems, problems


def test_every_readme_config_validates(tmp_path: Path) -> None:
    """The README's TOML examples pass ``edge-agent config validate`` (what it promises)."""
    blocks = re.findall(r"^```toml\n(.*?)^```", _README.read_text(encoding="utf-8"), re.M | re.S)
    assert len(blocks) >= 2, "the install guide's Jetson and Pi configs"
    for index, block in enumerate(blocks):
        path = tmp_path / f"readme-{index}.toml"
        path.write_text(block, encoding="utf-8")
        args = build_parser().parse_args(["config", "validate", str(path)])
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            status = args.func(args)
        assert status == 0, f"README TOML block {index + 1}:\n{block}\n{out.getvalue()}"
        assert out.getvalue().strip() == f"{path}: ok"
