"""The candidate perturbations of a dataset's screen (the ``screen`` block of its entry).

A screen lists perturbations with no measured cells (``candidates``, ``candidates_file``, or
both, joined in that order) for every model to rank by predicted effect
(:mod:`lingshu.evaluate.candidates`). They enter the perturbation features table
(:func:`lingshu.data.features.compute_features`) and with it what every model is fitted with,
so that a model knows each candidate's features and target genes the way it knows a held-out
perturbation's.

The config's list is checked when the config is validated (:mod:`lingshu.plan`); the file is
read here, when a job needs it (a dry run needs none), in the format of the split's list files
(:func:`lingshu.data.split.read_perturbation_list`; repeated lines of a file count once).
"""

from __future__ import annotations

from lingshu.config import DatasetEntry
from lingshu.constants import CONTROL
from lingshu.data.split import read_perturbation_list
from lingshu.errors import input_error


def screen_candidates(entry: DatasetEntry) -> list[str]:
    """The entry's candidate labels in order (``[]`` without a screen).

    Raises InputError naming ``config: datasets.<name>.screen.<field>`` for a file that is
    missing or empty, a label both listed and in the file, or the control label in the file.
    """
    screen = entry.screen or {}
    where = f"config: datasets.{entry.name}"
    listed = [str(c) for c in screen.get("candidates") or []]
    from_file: list[str] = []
    if screen.get("candidates_file"):
        from_file = read_perturbation_list(screen["candidates_file"], where,
                                           field="screen.candidates_file")
    twice = sorted(set(listed) & set(from_file))
    if twice:
        raise input_error(where, "screen.candidates_file",
                          f"{twice[:8]} are both listed under screen.candidates and in the "
                          f"file {screen['candidates_file']}",
                          "name each candidate once (in the list or in the file)")
    controls = [c for c in from_file if c in (CONTROL, entry.columns.control)]
    if controls:
        raise input_error(where, "screen.candidates_file",
                          f"{controls[0]!r} in {screen['candidates_file']} is the control label, "
                          "not a perturbation", "remove it from the file")
    return listed + from_file
