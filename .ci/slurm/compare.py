"""Compare the SLURM run's report table with the local run's, and its SLURM jobs with the jobs
Snakemake planned.

usage: python .ci/slurm/compare.py LOCAL_TABLE SLURM_TABLE PLANNED_JOBS SACCT_OUT

PLANNED_JOBS: the dry run's output (its "Job stats" table); SACCT_OUT: `sacct -a -X -n -P -o
JobID,State,ExitCode,Comment` of the run. Prints a summary; exits 1 on any difference.
"""

import re
import sys
from collections import Counter

import numpy as np
import pandas as pd

RTOL, ATOL = 1e-9, 1e-12
# Rules Snakemake runs in its own process, never submitted (targets without a command).
LOCAL_RULES = {"all"}


def planned_jobs(text: str) -> Counter:
    stats = text.split("Job stats:")[1].split("total")[0]
    jobs = Counter({m.group(1): int(m.group(2))
                    for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)})
    for rule in LOCAL_RULES:
        jobs.pop(rule, None)
    return jobs


def sacct_jobs(text: str) -> tuple[Counter, list[str]]:
    """Rule -> job count from the jobs' comments (``rule_<rule>[_wildcards_...]``), and the
    jobs that did not complete."""
    rules, bad = Counter(), []
    for line in text.strip().splitlines():
        jobid, state, exit_code, comment = line.split("|", 3)
        m = re.match(r"rule_(\w+?)(?:_wildcards_|$)", comment)
        rules[m.group(1) if m else f"?{comment}"] += 1
        if state != "COMPLETED" or exit_code != "0:0":
            bad.append(f"{jobid} {comment} {state} {exit_code}")
    return rules, bad


def compare_tables(local: pd.DataFrame, slurm: pd.DataFrame) -> list[str]:
    problems = []
    if list(local.columns) != list(slurm.columns):
        return [f"columns differ: {list(local.columns)} vs {list(slurm.columns)}"]
    if list(local["model"]) != list(slurm["model"]):
        return [f"rows differ: {list(local['model'])} vs {list(slurm['model'])}"]
    numeric = local.select_dtypes("number").columns
    a, b = local[numeric].to_numpy(float), slurm[numeric].to_numpy(float)
    same = np.isclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=True)
    identical = int(((a == b) | (np.isnan(a) & np.isnan(b))).sum())
    finite = ~(np.isnan(a) | np.isnan(b))
    max_diff = float(np.abs(a - b)[finite].max()) if finite.any() else 0.0
    print(f"metrics: {len(local)} rows x {len(numeric)} numeric columns = {a.size} values; "
          f"{identical} identical, max |difference| {max_diff:.3g} (tolerance rtol {RTOL:g})")
    for i, j in zip(*np.nonzero(~same)):
        problems.append(f"{local['model'].iloc[i]} {numeric[j]}: local {a[i, j]!r}, "
                        f"slurm {b[i, j]!r}")
    other = [c for c in local.columns if c not in numeric]
    if not local[other].fillna("").equals(slurm[other].fillna("")):
        problems.append(f"non-numeric columns differ: {other}")
    return problems


def main(local_table, slurm_table, planned_out, sacct_out) -> int:
    problems = []
    planned = planned_jobs(open(planned_out).read())
    ran, bad = sacct_jobs(open(sacct_out).read())
    print(f"jobs: Snakemake planned {sum(planned.values())} cluster jobs "
          f"(excluding {', '.join(sorted(LOCAL_RULES))}); sacct lists {sum(ran.values())}, "
          f"{sum(ran.values()) - len(bad)} COMPLETED with exit 0:0")
    print("  per rule (planned/sacct): " + ", ".join(
        f"{r} {planned[r]}/{ran[r]}" for r in sorted(set(planned) | set(ran))))
    if ran != planned:
        problems.append(f"sacct's jobs per rule {dict(ran)} != planned {dict(planned)}")
    problems += [f"job not COMPLETED: {b}" for b in bad]
    problems += compare_tables(pd.read_csv(local_table, sep="\t"),
                               pd.read_csv(slurm_table, sep="\t"))
    for p in problems:
        print(f"  PROBLEM: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
