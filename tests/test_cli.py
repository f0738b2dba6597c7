"""The `ds-cl` command line itself: usage errors, --version, and the help of every command (one process)."""

from __future__ import annotations

import pytest

from ds_cl import cli


def test_train_without_arguments_asks_for_the_config_only(capsys):
    """Overrides are optional: argparse called them required too (a `*` positional without a default)."""
    with pytest.raises(SystemExit) as e:
        cli.main(["train"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().endswith("error: the following arguments are required: config"), err


def test_version(capsys):
    from ds_cl import __version__

    for flag in ("--version", "-V"):
        assert cli.main([flag]) == 0
        assert capsys.readouterr().out == f"ds-cl {__version__}\n"
    assert "--version" in cli._usage()


class _Parser(Exception):
    """Carries the parser a command built, out of its main(): parse_args raises it instead of parsing."""


def _parser_of(monkeypatch, command: str):
    import argparse
    import importlib

    def capture(self, *args, **kwargs):
        raise _Parser(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    with pytest.raises(_Parser) as got:
        importlib.import_module(cli.COMMANDS[command][0]).main(["--help"])
    return got.value.args[0]


def _help_gaps(parser, name: str) -> list[str]:
    """What `--help` leaves out: a description that is missing or stops mid-sentence, an option or
    positional without its own help; sub-commands likewise."""
    import argparse

    gaps = []
    text = " ".join((parser.description or "").split())
    if not text or text[-1] not in ".)":
        gaps.append(f"{name}: description {'missing' if not text else 'stops mid-sentence: ...' + text[-50:]}")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, sub_parser in action.choices.items():
                gaps += _help_gaps(sub_parser, f"{name} {sub}")
        elif not isinstance(action, argparse._HelpAction) and action.help != argparse.SUPPRESS and not action.help:
            gaps.append(f"{name}: {'/'.join(action.option_strings) or action.dest} has no help")
    return gaps


# Their modules are others' to edit (ds_cl/evaluation, ds_cl/tools/bench.py, ds_cl/tools/retention.py):
# issue 32 item 6 lists their gaps, e.g. `score report` has no description.
HELP_OWNED_ELSEWHERE = {"bench", "retention", "eval", "score"}


@pytest.mark.parametrize("command", [
    pytest.param(c, marks=pytest.mark.xfail(reason="help gaps in a module owned elsewhere", strict=False))
    if c in HELP_OWNED_ELSEWHERE else c for c in cli.COMMANDS])
def test_help_covers_every_option_in_whole_sentences(command, monkeypatch):
    assert _help_gaps(_parser_of(monkeypatch, command), f"ds-cl {command}") == []
