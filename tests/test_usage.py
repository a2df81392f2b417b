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


def test_a_short_write_is_named_as_a_full_disk(tmp_path, capsys, monkeypatch):
    import errno

    from lingshu import cli

    assert "disk" in cli.machine_hint(RuntimeError(
        "[enforce fail at inline_container.cc:672] . unexpected pos 4860800 vs 4860688"))
    assert "disk" in cli.machine_hint(OSError(errno.ENOSPC, "No space left on device"))
    assert cli.machine_hint(ValueError("shape mismatch")) == ""

    def full(args):  # what torch.save raised when the disk filled during a pre-training
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 48 vs 0")

    monkeypatch.setattr(cli, "cmd_simulate", full)  # the parser takes it when main builds it
    assert cli.main(["simulate", "--params", "{}", "--seed", "0",
                     "--out", str(tmp_path / "x.h5ad")]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("ERROR: lingshu simulate failed: RuntimeError:")
    assert "the disk holding the outputs is probably full" in last
