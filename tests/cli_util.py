"""Shared checks for CLI tests."""

from __future__ import annotations


def one_line_error(result, *fragments: str) -> None:
    """A CLI failure the user can act on: exit 2, exactly one `error: ...` line on stderr
    containing every fragment, nothing on stdout."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert result.stdout == ""
