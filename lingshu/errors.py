"""Errors that reach the user: each names the file, the field and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class InputError(ValueError):
    """Bad user input (a data file, a config entry, a feature table).

    Build it with :func:`input_error` so that the message always has the same three parts.
    """


class CorruptFileError(InputError):
    """A file the pipeline wrote earlier (a checkpoint, a model file) cannot be read: it is
    truncated, corrupt, or holds more than data (pickled code). The message names the file and
    says to delete it and re-run the rule that writes it."""


def input_error(path: object, field: str, problem: str, fix: str) -> InputError:
    """Return an :class:`InputError` whose message reads ``<path>: <field>: <problem>. Fix: <fix>``."""
    return InputError(f"{path}: {field}: {problem}. Fix: {fix}")


def corrupt_file_error(path: object, what: str, err: BaseException | str) -> CorruptFileError:
    """A :class:`CorruptFileError` for ``path`` (``what``: e.g. "a training checkpoint")."""
    why = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    return CorruptFileError(
        f"{path}: cannot be read as {what} ({why}); it is truncated, corrupt, or not a file "
        f"this pipeline wrote. Fix: delete it and re-run the rule that writes it (Snakemake "
        f"re-runs a rule whose output is missing)")


def configured_source(dataset: str, source: dict[str, Any] | None, read: object = None,
                      block: str = "source") -> str:
    """How a data error names its data: the dataset entry and the file the user configured,
    e.g. ``config: datasets.kang (source.path '../data/kang.h5ad')``, not the pipeline's
    link to it (``results/kang/raw/source.h5ad``).

    read: the file actually read. It is named too when it is not the configured file itself
    (a download of ``source.url``, or a caller that passes another file); a link to the
    configured file is not named.
    block: the entry's key holding ``source`` (``source``, or ``prior.source``).
    """
    source = source or {}
    here = f"config: datasets.{dataset}"
    if "path" in source:
        what = f"{block}.path {str(source['path'])!r}"
        configured = Path(str(source["path"])).expanduser()
        if read is not None and not _same_file(Path(str(read)), configured):
            what += f", read from {read}"
    elif "url" in source:
        what = f"{block}.url {str(source['url'])!r}"
        if read is not None:
            what += f", downloaded to {read}"
    elif "simulate" in source:
        what = f"{block}.simulate" + (f", written to {read}" if read is not None else "")
    else:
        return f"{here} ({read})" if read is not None else here
    return f"{here} ({what})"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False
