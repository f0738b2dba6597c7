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
