"""What a user sees when a workflow run fails: each failed job's own error, last.

Every job writes its output to its log (``results/<dataset>/logs/<job>.log``) and, when it
fails, ends it with one line ``ERROR: <what, where, the fix>`` (:func:`lingshu.cli.main`).
Snakemake reports a failed job with its generic text (the exception, the whole shell command
with the dataset entry as JSON) and the path of the log, so the message that says what to do
would be one file away, above a screenful of other text. The Snakefile's ``onerror:`` handler
calls :func:`report_failures`, which prints, after everything Snakemake prints, each failed
job's rule, wildcards, log and the end of that log (its ``ERROR:`` line), plus what to run next.
"""

from __future__ import annotations

import atexit
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

TAIL_BYTES = 64 * 1024  # how much of the end of a log is read
N_LINES = 6  # lines shown from a log that has no ERROR: line
RULE = "=" * 78


@dataclass
class FailedJob:
    """A failed job as the report names it."""

    rule: str
    wildcards: dict[str, str] = field(default_factory=dict)
    logs: list[str] = field(default_factory=list)

    def title(self) -> str:
        wc = ", ".join(f"{k}={v}" for k, v in self.wildcards.items())
        return f"{self.rule} ({wc})" if wc else self.rule


def log_tail(path: str | Path, n_lines: int = N_LINES) -> list[str]:
    """The end of a job's log: from its last ``ERROR:`` line on, else its last ``n_lines``
    lines (progress bars, which redraw with carriage returns, count by their last state)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - TAIL_BYTES))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = [line.split("\r")[-1].rstrip() for line in text.split("\n")]
    lines = [line for line in lines if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("ERROR:")]
    if errors:
        return lines[errors[-1]:]
    return lines[-n_lines:]


def failed_jobs(workflow: Any, snakemake_logs: Iterable[str] = ()) -> list[FailedJob]:
    """The jobs of this run that failed: from Snakemake's scheduler, or (when that is not
    available) from the ``Error in rule`` blocks of Snakemake's own log files."""
    scheduler = getattr(workflow, "scheduler", None)
    failed = getattr(scheduler, "failed", None)
    if failed:
        jobs = []
        for job in failed:
            try:
                wildcards = {k: str(v) for k, v in dict(job.wildcards_dict).items()}
            except Exception:  # noqa: BLE001 - an internal API: degrade to no wildcards
                wildcards = {}
            jobs.append(FailedJob(job.rule.name, wildcards, [str(p) for p in (job.log or [])]))
        return sorted(jobs, key=lambda j: (j.rule, sorted(j.wildcards.items())))
    jobs = []
    for path in snakemake_logs or []:
        try:
            jobs += parse_snakemake_log(Path(path).read_text(errors="replace"))
        except OSError:
            continue
    return jobs


_ERROR_BLOCK = re.compile(r"^Error in rule (\S+):\s*$")


def parse_snakemake_log(text: str) -> list[FailedJob]:
    """The failed jobs named by ``Error in rule <rule>:`` blocks of a Snakemake log (each
    once, however often Snakemake repeats it)."""
    jobs: dict[tuple, FailedJob] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = _ERROR_BLOCK.match(line.strip())
        if not match:
            continue
        job = FailedJob(match.group(1))
        for item in lines[i + 1:]:
            if not item.startswith("    ") or item.strip().startswith("shell:"):
                break
            key, _, value = item.strip().partition(": ")
            if key == "wildcards":
                job.wildcards = dict(pair.split("=", 1) for pair in value.split(", ")
                                     if "=" in pair)
            elif key == "log":
                value = value.split(" (check log file")[0]
                job.logs = [p.strip() for p in value.split(", ") if p.strip()]
        jobs[(job.rule, tuple(sorted(job.wildcards.items())), tuple(job.logs))] = job
    return list(jobs.values())


def failure_report(jobs: list[FailedJob]) -> str:
    """The text printed after a failed run: each failed job's own error, then what to do."""
    if not jobs:
        return ""
    out = ["", RULE, f"lingshu-bench: {len(jobs)} job(s) failed. Each one's own error (the end "
                     "of its log):"]
    for job in jobs:
        out.append("")
        out.append(f"* {job.title()}" + (f"  [log: {', '.join(job.logs)}]" if job.logs else ""))
        tail = [line for log in job.logs for line in log_tail(log)]
        if not tail:
            out.append("    (its log is empty or missing: the job was killed or failed to start; "
                       "see Snakemake's message above)")
        elif not any(line.startswith("ERROR:") for line in tail):
            out.append("    (no ERROR line: the job may have been killed, e.g. out of memory or "
                       "past a time limit; its log ends with)")
        out += [f"    {line}" for line in tail]
    out += ["",
            "Fix the cause and run the same command again: finished jobs are kept. After a hard "
            "kill (SIGKILL, a lost node) run `snakemake --unlock` first, and add "
            "`--rerun-incomplete` if Snakemake names incomplete files. See README, \"When a run "
            "fails\".",
            RULE]
    return "\n".join(out)


def report_failures(workflow: Any, snakemake_logs: Iterable[str] = (),
                    stream: TextIO | None = None, at_exit: bool = True) -> None:
    """The Snakefile's ``onerror:`` handler: print :func:`failure_report` of this run.

    at_exit: print when the process exits, i.e. after Snakemake's own closing lines (the path
    of its log, "At least one job did not complete successfully"), so that the jobs' errors
    are the last thing on the terminal.
    """
    text = failure_report(failed_jobs(workflow, list(snakemake_logs or [])))
    if not text:
        return

    def show() -> None:
        print(text, file=stream or sys.stderr, flush=True)

    if at_exit:
        atexit.register(show)
    else:
        show()
