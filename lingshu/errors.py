"""Errors that reach the user: each names the file, the field and the fix."""


class InputError(ValueError):
    """Bad user input (a data file, a config entry, a feature table).

    Build it with :func:`input_error` so that the message always has the same three parts.
    """


def input_error(path: object, field: str, problem: str, fix: str) -> InputError:
    """Return an :class:`InputError` whose message reads ``<path>: <field>: <problem>. Fix: <fix>``."""
    return InputError(f"{path}: {field}: {problem}. Fix: {fix}")
