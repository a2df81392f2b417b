"""A job's own CPU time, written as the last line of its log and read back by the report.

Snakemake's ``benchmark:`` files sample a job's processes (every second for its first 30 s,
then every 30 s), so a job's CPU time lacks whatever ran after the last sample: on the default
run Lingshu-Cell's generation and prediction jobs (30 and 33 CPU-seconds by their own count)
were recorded at 15 each, scLDM's fit (27) at 15. Every ``python -m lingshu`` command instead ends its log with one line,
``lingshu usage: {"command": ..., "wall_s": ..., "cpu_s": ...}``, where ``cpu_s`` is the user and
system time the operating system counted for the process and for every process it started and
waited for (a model's own subprocesses included, e.g. STATE's ``state tx train``). The
report's cost table (:func:`lingshu.report.tables.benchmark_table`) takes a job's CPU time
from its log's usage lines (summed: under ``torchrun`` each rank writes its own) and falls
back to Snakemake's figure for a job whose log has none.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

PREFIX = "lingshu usage: "


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its waited-for children so far."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def usage_line(command: str, wall_s: float) -> str:
    """The line a finished command writes to its log."""
    return PREFIX + json.dumps({"command": command, "wall_s": round(wall_s, 3),
                                "cpu_s": round(cpu_seconds(), 3)})


def read_cpu_seconds(log: str | Path) -> float | None:
    """The CPU seconds the usage lines of a job's log add up to; None when the log is missing
    or has no usage line (a job that failed, or one that is not a ``lingshu`` command)."""
    try:
        text = Path(log).read_text(errors="replace")
    except (FileNotFoundError, IsADirectoryError):
        return None
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(PREFIX):
            try:
                total += float(json.loads(line[len(PREFIX):])["cpu_s"])
                found = True
            except (ValueError, KeyError, TypeError):
                continue
    return total if found else None
