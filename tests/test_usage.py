"""lingshu.usage: every command's own CPU time, at the end of its log."""

import json

from lingshu.cli import main
from lingshu.usage import PREFIX, read_cpu_seconds


def test_every_lingshu_command_ends_its_log_with_its_cpu_time(tmp_path, capsys):
    out = tmp_path / "sim.h5ad"
    assert main(["simulate", "--params", json.dumps({"n_genes": 100, "n_cells": 200}),
                 "--seed", "0", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(PREFIX)
    usage = json.loads(last[len(PREFIX):])
    assert usage["command"] == "simulate" and usage["cpu_s"] > 0 and usage["wall_s"] > 0
    log = tmp_path / "job.log"
    log.write_text(err)
    assert read_cpu_seconds(log) == usage["cpu_s"]
