"""The generic MDDM training loop: schedule, EMA, resume, atomic checkpoints, accumulation, DDP."""

from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from lingshu.models.training import (
    EMA, TrainConfig, ema_weights, load_checkpoint, lr_at, param_groups, train,
)

ROOT = Path(__file__).resolve().parent.parent
D, H, N = 8, 32, 256


class Toy(nn.Module):
    """A 2-layer MLP denoiser (with a norm and dropout, so the global RNG matters too)."""

    def __init__(self, dropout: float = 0.1, cond: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(D, H)
        self.norm = nn.LayerNorm(H)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(H, D)
        if cond:
            self.cond = nn.Embedding(3, H)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.norm(self.fc1(x)))))


def make_data(seed: int = 123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, 2, generator=g)
    return z @ torch.randn(2, D, generator=g)  # rank-2 structure: learnable denoising


DATA = make_data()


def sample_batch(n: int, g: torch.Generator) -> torch.Tensor:
    idx = torch.randint(0, N, (n,), generator=g, device=g.device)
    return DATA[idx]


def denoise_loss(model: nn.Module, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    t = torch.rand(x.shape[0], 1, generator=g, device=x.device)  # noise level per cell
    noise = torch.randn(x.shape, generator=g, device=x.device)
    return ((model(x + t * noise) - x) ** 2).mean()


def cfg(**kw) -> TrainConfig:
    base = dict(steps=20, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=5, ema_decay=0.9,
                checkpoint_every=10, log_every=5)
    base.update(kw)
    return TrainConfig(**base)


def fresh_model(seed: int, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return Toy(**kw)


# --------------------------------------------------------------------------------------------
def test_lr_schedule():
    c = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, c) == 0.0
    assert lr_at(5, c) == pytest.approx(0.5)
    warm = [lr_at(s, c) for s in range(0, 11)]
    assert all(b - a == pytest.approx(0.1) for a, b in zip(warm, warm[1:]))  # linear
    assert lr_at(10, c) == pytest.approx(1.0)
    all_lrs = [lr_at(s, c) for s in range(0, 101)]
    assert max(all_lrs) == pytest.approx(1.0) and all_lrs.index(max(all_lrs)) == 10
    decay = all_lrs[10:]
    assert all(b <= a for a, b in zip(decay, decay[1:]))
    assert lr_at(55, c) == pytest.approx(0.55)  # cosine midpoint
    assert lr_at(100, c) == pytest.approx(0.1)
    assert lr_at(150, c) == pytest.approx(0.1)
    assert lr_at(3, TrainConfig(steps=10, lr=1.0, min_lr=0.0, warmup_steps=0)) == \
        pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))


def test_param_groups_decay_matrices_only():
    model = Toy(cond=True)
    groups = param_groups(model, 0.1)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names == {"fc1.weight", "fc2.weight"}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_lingshu_head_bias_table_is_not_decayed():
    # a (genes, tokens) table of log-probabilities: two dimensions, but a bias. Decayed, AdamW
    # pulls every gene toward the uniform distribution over tokens at every step
    from lingshu.models.mddm.network import LingshuNetwork, config_from_preset

    net = LingshuNetwork(config_from_preset("tiny", 24, gene_head_rank=2))
    groups = param_groups(net, 0.1)
    decayed = {n for n, p in net.named_parameters()
               for g in groups if g["weight_decay"] > 0 and any(p is q for q in g["params"])}
    assert "head_bias" not in decayed
    assert {"head.weight", "compress.weight", "gene_head_up"} <= decayed


def test_lr_scale_multiplies_the_learning_rate_of_parameters_by_name_prefix(tmp_path):
    model = Toy(cond=True)
    groups = param_groups(model, 0.1, {"fc2": 0.0, "fc2.bias": 2.0})
    scale = {n: g.get("lr_scale", 1.0) for g in groups for n, p in model.named_parameters()
             if any(p is q for q in g["params"])}
    assert scale == {"fc1.weight": 1.0, "fc1.bias": 1.0, "norm.weight": 1.0, "norm.bias": 1.0,
                     "fc2.weight": 0.0, "fc2.bias": 2.0, "cond.weight": 1.0}  # longest prefix
    # In training: a multiplier of 0 freezes fc2.weight while everything else moves.
    model = fresh_model(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, denoise_loss, sample_batch, cfg(steps=3, lr_scale={"fc2.weight": 0.0}),
          tmp_path / "s.pt", progress=False)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == set(before) - {"fc2.weight"}


def test_ema():
    model = Toy()
    ema = EMA(model, decay=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model)
    for n, p in model.named_parameters():
        assert torch.equal(ema.shadow[n], p)

    d = 0.9
    ema = EMA(model, decay=d)
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2).add_(1)
    ema.update(model)
    first = 1.0 / 10.0  # warmed-up decay of the first update: min(d, (1 + 0) / (10 + 0))
    for n, p in model.named_parameters():
        torch.testing.assert_close(ema.shadow[n], first * old[n] + (1 - first) * p.detach())
    assert ema.current_decay() == pytest.approx(2 / 11)
    ema.num_updates = 1000
    assert ema.current_decay() == d  # warm-up over: the configured decay
    ema.num_updates = 1
    other = Toy()
    ema.copy_to(other)
    for n, p in other.named_parameters():
        assert torch.equal(p, ema.shadow[n])
    ema2 = EMA(Toy(), decay=0.5, warmup=False)
    ema2.load_state_dict(ema.state_dict())
    assert ema2.decay == d and ema2.num_updates == 1 and ema2.warmup
    assert all(torch.equal(ema2.shadow[n], ema.shadow[n]) for n in ema.shadow)

    # From trained weights (fine-tuning): the configured decay from the first update.
    ema3 = EMA(model, decay=d, warmup=False)
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    ema3.update(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ema3.shadow[n], d * old[n] + (1 - d) * p.detach())
    assert ema3.current_decay() == d


def test_training_lowers_loss(tmp_path):
    model = fresh_model(0, dropout=0.0)
    res = train(model, denoise_loss, sample_batch,
                cfg(steps=150, batch_size=64, lr=1e-2, min_lr=1e-3, warmup_steps=10,
                    checkpoint_every=1000, log_every=50),
                tmp_path / "ck.pt", progress=False, loss_curve_path=tmp_path / "curve.png")
    first, last = sum(res.losses[:10]) / 10, sum(res.losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    assert len(res.losses) == res.steps == 150
    assert res.cells_per_second > 0 and res.peak_memory_mb > 0 and res.memory_kind == "rss"
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ck = load_checkpoint(tmp_path / "ck.pt")
    assert ck["step"] == 150 and ck["config"]["steps"] == 150
    # the EMA weights load into a fresh model for sampling
    Toy(dropout=0.0).load_state_dict(ema_weights(ck), strict=True)
    assert ema_weights(tmp_path / "ck.pt").keys() == ck["model"].keys()


def test_resume_continues_the_same_loss_curve(tmp_path):
    full = fresh_model(0)
    r_full = train(full, denoise_loss, sample_batch, cfg(), tmp_path / "a.pt", progress=False)
    assert len(r_full.losses) == 20

    calls = {"n": 0}

    def killed_sampler(n, g):
        calls["n"] += 1
        if calls["n"] == 14:  # dies during step 14, after the step-10 checkpoint
            raise KeyboardInterrupt("killed")
        return sample_batch(n, g)

    with pytest.raises(KeyboardInterrupt):
        train(fresh_model(0), denoise_loss, killed_sampler, cfg(), tmp_path / "b.pt",
              progress=False)
    assert load_checkpoint(tmp_path / "b.pt")["step"] == 10

    torch.manual_seed(12345)  # a "new process": different global RNG and initial weights
    _ = torch.rand(100)
    resumed = fresh_model(7)
    r_res = train(resumed, denoise_loss, sample_batch, cfg(), tmp_path / "b.pt", progress=False)
    assert r_res.start_step == 10 and len(r_res.losses) == 20
    assert r_res.losses[:10] == r_full.losses[:10]
    assert r_res.losses[10:] == r_full.losses[10:]  # exact float equality
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n
    ca, cb = load_checkpoint(tmp_path / "a.pt"), load_checkpoint(tmp_path / "b.pt")
    assert all(torch.equal(ca["ema"]["shadow"][k], cb["ema"]["shadow"][k]) for k in ca["ema"]["shadow"])

    # a finished checkpoint makes a rerun a no-op
    r_again = train(fresh_model(3), denoise_loss, sample_batch, cfg(), tmp_path / "b.pt",
                    progress=False)
    assert r_again.start_step == 20 and r_again.losses == r_full.losses


def test_checkpoint_atomic_and_weights_only(tmp_path, monkeypatch):
    ck = tmp_path / "ck.pt"
    train(fresh_model(0), denoise_loss, sample_batch, cfg(steps=10, checkpoint_every=5), ck,
          progress=False)
    before = ck.read_bytes()
    state = torch.load(ck, weights_only=True)
    assert state["step"] == 10 and len(state["losses"]) == 10
    assert set(state) >= {"model", "optimizer", "ema", "step", "losses", "rng", "config"}
    assert len(state["rng"]["generator"]) == 1 and state["rng"]["torch_cpu"][0].dtype == torch.uint8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]

    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        real_save({"partial": torch.zeros(3)}, f)  # half-written bytes, then the disk fills up
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(fresh_model(0), denoise_loss, sample_batch, cfg(steps=15, checkpoint_every=5), ck,
              progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert ck.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]  # no temp file left
    assert load_checkpoint(ck)["step"] == 10


def test_init_state_dict_strict_false_is_logged(tmp_path, caplog):
    pre = fresh_model(0).state_dict()
    pre["bogus.weight"] = torch.zeros(2)
    model = fresh_model(1, cond=True)
    with caplog.at_level(logging.INFO, logger="lingshu.models.training.loop"):
        res = train(model, denoise_loss, sample_batch, cfg(steps=0), tmp_path / "ck.pt",
                    progress=False, init_state_dict=pre)
    assert res.missing_keys == ["cond.weight"] and res.unexpected_keys == ["bogus.weight"]
    assert "cond.weight" in caplog.text and "bogus.weight" in caplog.text
    for k, v in model.state_dict().items():
        if k != "cond.weight":
            assert torch.equal(v, pre[k]), k
    # and it trains from there
    res = train(model, denoise_loss, sample_batch, cfg(steps=3), tmp_path / "ck2.pt",
                progress=False, init_state_dict=pre)
    assert len(res.losses) == 3
    # the average of a run from trained weights has no warm-up; one from scratch has
    assert load_checkpoint(tmp_path / "ck2.pt")["ema"]["warmup"] is False
    train(fresh_model(1, cond=True), denoise_loss, sample_batch, cfg(steps=1),
          tmp_path / "ck3.pt", progress=False)
    assert load_checkpoint(tmp_path / "ck3.pt")["ema"]["warmup"] is True


def test_gradient_accumulation_matches_full_batch(tmp_path):
    data = make_data(5)[:8]

    def ordered_sampler():
        pos = {"i": 0}

        def sample(n, g):
            out = data[pos["i"]:pos["i"] + n]
            pos["i"] += n
            return out
        return sample

    def mse(model, x, g):  # a mean over cells
        return ((model(x) - x) ** 2).mean()

    results = {}
    for name, micro in (("full", None), ("accum", 4)):
        model = fresh_model(0, dropout=0.0)
        c = cfg(steps=1, batch_size=8, micro_batch_size=micro, warmup_steps=0, lr=1e-2)
        res = train(model, mse, ordered_sampler(), c, tmp_path / f"{name}.pt", progress=False)
        results[name] = (res, model, load_checkpoint(tmp_path / f"{name}.pt"))
    (rf, mf, cf), (ra, ma, ca) = results["full"], results["accum"]
    assert rf.losses[0] == pytest.approx(ra.losses[0], rel=1e-6)
    for (n, a), (_, b) in zip(mf.state_dict().items(), ma.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7), n
    # the first moments are (1 - beta1) * gradient: the accumulated gradient matches
    for k, st in cf["optimizer"]["state"].items():
        torch.testing.assert_close(st["exp_avg"], ca["optimizer"]["state"][k]["exp_avg"],
                                   rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(st["exp_avg_sq"], ca["optimizer"]["state"][k]["exp_avg_sq"],
                                   rtol=1e-5, atol=1e-12)


def test_bad_batch_split_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="micro_batch_size"):
        train(Toy(), denoise_loss, sample_batch, cfg(batch_size=10, micro_batch_size=4),
              tmp_path / "x.pt", progress=False)


DDP_SCRIPT = """
import os, sys, torch
from torch import nn
sys.path.insert(0, {tests!r})
from test_training import Toy, denoise_loss, sample_batch
from lingshu.models.training import TrainConfig, train

out = {out!r}
rank = int(os.environ["RANK"])
torch.manual_seed(100 + rank)  # different initial weights per rank: DDP must broadcast rank 0's
model = Toy()
cfg = TrainConfig(steps=4, batch_size=8, micro_batch_size=2, lr=1e-2, warmup_steps=1,
                  checkpoint_every=2, log_every=1)
res = train(model, denoise_loss, sample_batch, cfg, os.path.join(out, "ck.pt"), progress=False,
            loss_curve_path=os.path.join(out, "curve.png"))
assert res.world_size == 2
torch.save({{"state": model.state_dict(), "losses": res.losses}},
           os.path.join(out, f"weights_rank{{rank}}.pt"))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "ddp_script.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=str(ROOT / "tests"), out=str(out))))
    # torchrun's torchelastic_* folder goes to the test's temporary folder, not /tmp
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", TMPDIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    w0 = torch.load(out / "weights_rank0.pt", weights_only=True)
    w1 = torch.load(out / "weights_rank1.pt", weights_only=True)
    for k in w0["state"]:
        assert torch.equal(w0["state"][k], w1["state"][k]), k
    assert w0["losses"] == w1["losses"] and len(w0["losses"]) == 4  # losses are all-reduced
    ck = load_checkpoint(out / "ck.pt")
    assert ck["step"] == 4 and ck["world_size"] == 2
    assert len(ck["rng"]["generator"]) == 2
    assert not torch.equal(ck["rng"]["generator"][0], ck["rng"]["generator"][1])  # own streams
    for k in w0["state"]:
        assert torch.equal(ck["model"][k], w0["state"][k])
    assert sorted(p.name for p in out.iterdir()) == ["ck.pt", "curve.png", "weights_rank0.pt",
                                                      "weights_rank1.pt"]


def test_state_of_other_inputs_is_not_resumed(tmp_path):
    first = train(fresh_model(0), denoise_loss, sample_batch, cfg(), tmp_path / "s.pt",
                  progress=False, fingerprint="inputs-A")
    # same fingerprint: the finished state is reused, nothing trains
    again = train(fresh_model(0), denoise_loss, sample_batch, cfg(), tmp_path / "s.pt",
                  progress=False, fingerprint="inputs-A")
    assert again.start_step == 20
    # other inputs: the stale state is ignored and overwritten by a fresh run
    other = train(fresh_model(0), denoise_loss, sample_batch, cfg(), tmp_path / "s.pt",
                  progress=False, fingerprint="inputs-B")
    assert other.start_step == 0 and other.losses == first.losses
    assert load_checkpoint(tmp_path / "s.pt")["fingerprint"] == "inputs-B"


# -- untrusted files: truncated, garbage or code-carrying checkpoints ------------------------


class _Exploit:
    """Unpickling this runs code (writes a file): what weights_only must refuse."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _bad_checkpoints(tmp_path: Path, good: Path) -> dict[str, Path]:
    data = good.read_bytes()
    files = {"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}
    out = {}
    for name, blob in files.items():
        out[name] = tmp_path / f"{name}.pt"
        out[name].write_bytes(blob)
    out["pickled code"] = tmp_path / "exploit.pt"
    torch.save({"format": "lingshu-mddm-train/1", "model": _Exploit(tmp_path / "pwned")},
               out["pickled code"])
    out["not a dict"] = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], out["not a dict"])
    return out


def test_a_bad_checkpoint_is_a_clear_error_naming_the_file(tmp_path):
    from lingshu.errors import CorruptFileError

    good = tmp_path / "good.pt"
    train(fresh_model(0), denoise_loss, sample_batch, cfg(steps=5), good, progress=False)
    for name, path in _bad_checkpoints(tmp_path, good).items():
        with pytest.raises(CorruptFileError) as info:
            load_checkpoint(path)
        msg = str(info.value)
        assert msg.startswith(f"{path}: cannot be read as a checkpoint"), (name, msg)
        assert "delete it and re-run the rule" in msg, name
    assert not (tmp_path / "pwned").exists()  # the pickled code never ran
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")


def test_corrupt_resumable_state_is_reported_and_training_restarts(tmp_path, caplog):
    """A resumable state that cannot be read (or is not a training checkpoint) is a shortcut
    lost, not an error: the loop says so and trains from scratch, as an uninterrupted run."""
    fresh = train(fresh_model(0), denoise_loss, sample_batch, cfg(), tmp_path / "fresh.pt",
                  progress=False)
    for name, path in _bad_checkpoints(tmp_path, tmp_path / "fresh.pt").items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lingshu.models.training.loop"):
            again = train(fresh_model(0), denoise_loss, sample_batch, cfg(), path,
                          progress=False)
        assert again.start_step == 0 and again.losses == fresh.losses, name
        assert str(path) in caplog.text and "Training afresh" in caplog.text, name
        assert load_checkpoint(path)["step"] == 20, name  # overwritten by a good one
    assert not (tmp_path / "pwned").exists()
    # a checkpoint without the state a resume needs restarts too
    torch.save({"format": "lingshu-mddm-train/1", "step": 10}, tmp_path / "partial.pt")
    again = train(fresh_model(0), denoise_loss, sample_batch, cfg(), tmp_path / "partial.pt",
                  progress=False)
    assert again.start_step == 0 and again.losses == fresh.losses
