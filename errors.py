"""User mistakes as one line: the exception the command-line entry points turn into `error: ...` and exit code 2,
and an argparse parser that reports bad flags the same way. No heavy imports, so every CLI can use it."""

import argparse
import sys


class UserError(Exception):
    """A problem the user can fix (bad flag, missing key, unknown model, corrupt file): no traceback."""


class OracleError(UserError):
    """The response oracle cannot be used as configured (auth, permissions, unsupported endpoint)."""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line naming the problem (and exits 2) instead of usage + error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def run_cli(main_fn) -> int:
    """Run a command's body, turning a UserError into `error: ...` on stderr and exit code 2: the one epilogue of
    every command line in the project. Returns the body's exit code (0 when it returns None)."""
    try:
        code = main_fn()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if code is None else code
