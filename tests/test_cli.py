"""The `ds-cl` command line itself: usage errors, --version, and the help of every command (one process)."""

from __future__ import annotations

import io
import itertools
import re

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


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_help_covers_every_option_in_whole_sentences(command, monkeypatch):
    parser = _parser_of(monkeypatch, command)
    assert _help_gaps(parser, f"ds-cl {command}") == []
    # What `--help` prints is formatted with %-style expansion: a bare `%` in a help text crashes it.
    assert "usage:" in parser.format_help()


# -- log lines and progress -------------------------------------------------------------------------


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_log_lines_start_with_the_prefix_then_the_time():
    """`[ds-cl] YYYY-MM-DD HH:MM:SS msg`: the prefix first, as the tools that echo a run's own lines pick them
    by it (ds_cl/tools/local_runs.py)."""
    from ds_cl.training.outputs import log_line

    line = log_line("task 0 (a): 8 samples")
    assert re.fullmatch(r"\[ds-cl\] \d{4}-\d\d-\d\d \d\d:\d\d:\d\d task 0 \(a\): 8 samples", line), line


def test_progress_is_plain_lines_when_the_output_is_not_a_terminal(monkeypatch):
    """In a log file tqdm's `\\r` frames pile up into one line; there, a line on the first step, then one every
    `every_s` seconds, and on the last step."""
    from ds_cl.training import outputs

    clock = itertools.chain([0.0, 10.0, 20.0, 70.0, 80.0, 200.0], itertools.repeat(300.0))
    monkeypatch.setattr(outputs.time, "monotonic", lambda: next(clock))
    out = _Stream(tty=False)
    p = outputs.Progress(total=5, initial=0, desc="task 0 (a)", enabled=True, every_s=60, stream=out)
    for loss in (4.0, 3.0, 2.0, 1.5, 1.0):
        p.update(loss=loss)
    p.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 3, lines
    assert all(line.startswith("[ds-cl] ") for line in lines)
    assert lines[0].endswith("task 0 (a): step 1/5 (20%), loss 4.000, 10.0 s/step, ~40 s left")
    assert lines[1].endswith("task 0 (a): step 3/5 (60%), loss 2.000, 23.3 s/step, ~47 s left")
    assert lines[2].endswith("task 0 (a): step 5/5 (100%), loss 1.000, 40.0 s/step")
    quiet = _Stream(tty=False)
    outputs.Progress(total=5, initial=0, desc="a", enabled=False, stream=quiet).update(loss=1.0)  # other ranks
    assert quiet.getvalue() == ""


def test_progress_is_a_bar_on_a_terminal():
    from ds_cl.training import outputs

    term = _Stream(tty=True)
    p = outputs.Progress(total=3, initial=1, desc="b", enabled=True, stream=term)
    p.update(loss=0.5)
    p.close()
    assert "\r" in term.getvalue() and "loss=0.500" in term.getvalue() and "[ds-cl]" not in term.getvalue()
