"""The CLI documentation cannot drift from the commands (as sqlite-utils checks its cli-reference)."""

from pathlib import Path

from dsreg.cli.reference import commands, render

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_the_reference_is_every_commands_help():
    assert (DOCS / "cli-reference.md").read_text() == render(), (
        "docs/cli-reference.md is stale: run python -m dsreg.cli.reference docs/cli-reference.md"
    )


def test_the_guide_names_every_command():
    guide = (DOCS / "cli.md").read_text()
    missing = [" ".join(path) for path in commands()[1:] if f"dsreg {' '.join(path)}" not in guide]
    assert not missing, f"docs/cli.md does not describe: {missing}"
