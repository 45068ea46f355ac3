"""The one exception type the command-line entry points turn into a one-line message and a non-zero exit."""


class UserError(Exception):
    """A problem the user can fix (bad flag, missing key, unknown model, corrupt file): no traceback."""


class OracleError(UserError):
    """The response oracle cannot be used as configured (auth, permissions, unsupported endpoint)."""
