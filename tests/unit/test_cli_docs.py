"""The docs are tested: every command has help text and is documented in the README."""

from __future__ import annotations

import argparse
from pathlib import Path

from collector.cli import build_parser

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_has_help_and_is_in_the_readme() -> None:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in action._choices_actions}
    assert set(subcommands()) == {"trace", "collect", "serve", "dashboard", "demo", "export"}
    for name, sub in subcommands().items():
        assert helps.get(name), f"keytrace {name} has no help text"
        assert f"keytrace {name}" in README, f"keytrace {name} is not documented in README.md"
        for act in sub._actions:
            if act.dest != "help":
                assert act.help, f"keytrace {name} {act.option_strings or act.dest} has no help text"


def test_readme_gives_the_two_setup_commands() -> None:
    assert "bash scripts/demo.sh" in README
    assert "bash scripts/test.sh" in README
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci
