"""Lingshu-Cell's held-out diagnostics: bits per masked gene against the marginal floors."""

import math

import numpy as np
import pytest
import torch

from lingshu.models.mddm.diagnostics import (
    HeldOutDiagnostics,
    diagnostics_table,
    fixed_mask,
    floor_bits,
    marginal_log_probs,
    masked_bits,
)
from lingshu.tokens import N_EXPR_TOKENS


def _tokens(n, g, seed, shift=0):
    rng = np.random.default_rng(seed)
    return np.minimum(rng.poisson(np.linspace(0.2, 3.0, g) + shift, size=(n, g)), 10)


def test_fixed_mask_masks_exactly_k_genes_per_cell_and_is_seeded():
    m = fixed_mask(7, 40, 0.5, seed=3)
    assert m.shape == (7, 40) and (m.sum(1) == 20).all()
    assert torch.equal(m, fixed_mask(7, 40, 0.5, seed=3))
    assert not torch.equal(m, fixed_mask(7, 40, 0.5, seed=4))
    assert (fixed_mask(3, 10, 0.01, seed=0).sum(1) == 1).all()  # at least one gene
    with pytest.raises(ValueError, match="mask rate"):
        fixed_mask(3, 10, 0.0, seed=0)


def test_a_model_that_outputs_the_marginal_scores_exactly_the_marginal_floor():
    train, held = _tokens(500, 12, 0), _tokens(40, 12, 1)
    log_probs = marginal_log_probs([(train, None)])[None]  # (G, V)
    mask = fixed_mask(*held.shape, 0.5, seed=0)

    def marginal_model(x, rows):  # logits = the marginal log probabilities, for every cell
        return torch.as_tensor(log_probs, dtype=torch.float32).expand(x.shape[0], -1, -1)

    floor = floor_bits({None: log_probs}, held, mask.numpy())
    bits = masked_bits(marginal_model, torch.as_tensor(held), mask, batch=16)
    assert bits == pytest.approx(floor, rel=1e-5)
    # a uniform model is much worse: log2(V) bits
    uniform = masked_bits(lambda x, rows: torch.zeros(x.shape[0], x.shape[1], N_EXPR_TOKENS),
                          torch.as_tensor(held), mask)
    assert uniform == pytest.approx(math.log2(N_EXPR_TOKENS), rel=1e-5) and uniform > floor + 3


def test_marginals_count_blocks_like_one_array_and_know_a_certain_gene():
    train = _tokens(300, 5, 2)
    one = marginal_log_probs([(train, None)])[None]
    blocks = marginal_log_probs([(train[:100], None), (train[100:], None)])[None]
    assert np.allclose(one, blocks)
    assert np.allclose(np.exp(one).sum(1), 1.0)
    constant = np.zeros((50, 3), dtype=np.int64)  # every cell shows token 0 at every gene
    lp = marginal_log_probs([(constant, None)])[None]
    assert floor_bits({None: lp}, constant, np.ones_like(constant, bool)) < 0.05
    with pytest.raises(ValueError, match="tokens must lie"):
        marginal_log_probs([(np.full((2, 2), N_EXPR_TOKENS), None)])


def test_the_context_floor_is_below_the_marginal_floor_when_contexts_differ():
    a, b = _tokens(300, 10, 3, shift=0), _tokens(300, 10, 4, shift=4)
    train, groups = np.vstack([a, b]), np.array(["A"] * 300 + ["B"] * 300)
    held = np.vstack([_tokens(30, 10, 5, 0), _tokens(30, 10, 6, 4)])
    held_groups = np.array(["A"] * 30 + ["B"] * 30)
    diag = HeldOutDiagnostics(held, held_groups, lambda: [(train, groups)], seed=0)
    for rate in ("0.15", "0.5", "0.9"):
        assert diag.floors[f"context@{rate}"] < diag.floors[f"marginal@{rate}"] - 0.3
    out = diag(lambda x, rows: torch.zeros(x.shape[0], x.shape[1], N_EXPR_TOKENS))
    assert set(out) == {"model@0.15", "model@0.5", "model@0.9"}
    rows = diagnostics_table([{"step": 10, **out}], diag.floors)
    assert [r["mask_rate"] for r in rows] == [0.15, 0.5, 0.9]
    assert rows[0]["bits_marginal"] == diag.floors["marginal@0.15"]


def test_the_report_reads_each_models_diagnostics_once(tmp_path):
    import json

    import anndata as ad

    from lingshu.report.diagnostics import draw_diagnostics, final_diagnostics, read_diagnostics

    stage_rows = [{"step": s, "mask_rate": r, "bits_model": 3.0 - s / 100,
                   "bits_marginal": 2.5, "bits_context": 2.4}
                  for s in (50, 100) for r in (0.15, 0.9)]
    paths = {}
    for run, model, diag in (("lingshu", "lingshu", True), ("lingshu@w3", "lingshu", True),
                             ("linear", "linear", False)):
        pred = ad.AnnData(np.zeros((2, 3), np.float32))
        pred.uns["lingshu"] = {"model": model, "run": run}
        if diag:
            pred.uns["lingshu"]["diagnostics"] = json.dumps({"finetune": stage_rows})
        paths[run] = str(tmp_path / f"{run}.h5ad")
        pred.write_h5ad(paths[run])
    table = read_diagnostics(paths)
    assert len(table) == 4 and set(table["model"]) == {"lingshu"}  # variants share the fit
    last = final_diagnostics(table)
    assert list(last["step"]) == [100, 100]
    assert np.allclose(last["gain_over_marginal"], 2.5 - 2.0)
    draw_diagnostics(table, tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 1000
