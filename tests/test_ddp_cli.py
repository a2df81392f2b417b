"""Lingshu-Cell's pipeline commands under torchrun (2 CPU processes, gloo), as the rules launch
them when a model's block asks for several GPUs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_entry, make_processed

from lingshu.data.split import make_split, write_split
from lingshu.io import write_table
from lingshu.data.features import compute_features
from lingshu.models.harness import load_model

ROOT = Path(__file__).resolve().parent.parent
ENTRY = make_entry("genetic")
PARAMS = {"preset": "tiny", "pretrain_steps": 4, "finetune_steps": 4, "batch_size": 8,
          "micro_batch_size": 2, "warmup_steps": 1, "checkpoint_every": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_cli")
    adata = make_processed(n_genes=24)
    adata.write_h5ad(root / "processed.h5ad")
    split = make_split(adata.obs, {"kind": "heldout_perturbations",
                                   "test_perturbations": ["G2"]}, seed=0)
    write_split(split, root / "split")
    features = compute_features(adata, split, ENTRY, n_components=4, seed=0)
    write_table(features.reset_index(), root / "features.tsv")
    return root


def _torchrun(command: str, root: Path, out: Path, *extra: str) -> None:
    # torchrun leaves a torchelastic_* folder in the temporary directory: keep it in the test's
    tmp = root / "tmp"
    tmp.mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "lingshu", command, "--processed", str(root / "processed.h5ad"),
           "--split", str(root / "split"),
           "--features", str(root / "features.tsv"), "--model", "lingshu",
           "--params", json.dumps(PARAMS), "--entry", ENTRY.to_json(), "--seed", "0",
           "--workdir", str(root / "work"), "--out", str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_pretrain_and_fit_under_torchrun(inputs):
    _torchrun("pretrain", inputs, inputs / "work" / "pretrain.pt")
    assert (inputs / "work" / "pretrain.pt").exists()
    _torchrun("fit", inputs, inputs / "work" / "model.npz",
              "--init", str(inputs / "work" / "pretrain.pt"))
    model = load_model(str(inputs / "work" / "model.npz"))
    assert model.net_cfg.n_genes == 24
    leftovers = [p.name for p in (inputs / "work").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary files from a second writer
