"""Errors the builder reports to users: one line that names the problem and the fix."""


class BuildError(Exception):
    """A build failed for a reason the user can act on; the CLI prints it as one line."""
