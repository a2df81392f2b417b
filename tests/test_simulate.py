"""The simulator makes realistic, reproducible perturbation data whose ground truth matches its counts."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from lingshu.constants import CONTROL
from lingshu.data.simulate import SimulationParams, params_from_dict, simulate_dataset
from lingshu.stats import sample_negative_binomial
from lingshu.errors import InputError

SMALL = dict(n_genes=300, n_cells=1500, n_knockdowns=4, n_stimulations=2, seed=1)


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    return simulate_dataset(SimulationParams(**SMALL))


@pytest.fixture(scope="module")
def dense(adata) -> np.ndarray:
    """Counts as float (n_cells, n_genes); small enough to densify in tests."""
    return adata.X.toarray().astype(float)


def _mask(adata, **conditions) -> np.ndarray:
    """Boolean cell mask for obs column == value for every given column."""
    keep = np.ones(adata.n_obs, dtype=bool)
    for column, value in conditions.items():
        keep &= (adata.obs[column] == value).to_numpy()
    return keep


def _log_ratio(dense, cells_a, cells_b, genes, pseudo=0.05) -> np.ndarray:
    """log(mean counts in cells_a / mean counts in cells_b) per gene (libraries are comparable)."""
    return np.log((dense[cells_a][:, genes].mean(0) + pseudo) / (dense[cells_b][:, genes].mean(0) + pseudo))


def test_counts_are_integer_csr_with_canonical_obs(adata):
    assert sp.isspmatrix_csr(adata.X) or isinstance(adata.X, sp.csr_array)
    assert adata.X.dtype == np.int32
    assert adata.X.data.min() > 0  # no explicit zeros stored
    assert adata.var_names.is_unique and adata.var_names[0] == "GENE00001"
    for column in ("perturbation", "cell_type", "donor", "batch", "n_counts"):
        assert column in adata.obs
    np.testing.assert_array_equal(adata.obs["n_counts"], np.asarray(adata.X.sum(1)).ravel())
    perts = set(adata.obs["perturbation"])
    assert CONTROL in perts and {"STIM1", "STIM2"} <= perts
    knockdowns = perts - {CONTROL, "STIM1", "STIM2"}
    assert len(knockdowns) == 4 and knockdowns <= set(adata.var_names)


def test_negative_binomial_sampler_matches_its_moments():
    """Both paths of the sampler (CDF inversion for small means, gamma-Poisson above) are exact."""
    means = np.array([0.05, 0.5, 2.9, 3.1, 20.0], dtype=np.float32)
    theta = np.array([0.5, 3.0])
    rng = np.random.default_rng(0)
    for th in theta:
        draws = sample_negative_binomial(np.tile(means, (100_000, 1)), np.full(means.size, th), rng)
        assert draws.dtype == np.int32 and draws.min() >= 0
        np.testing.assert_allclose(draws.mean(0), means, rtol=0.03)
        np.testing.assert_allclose(draws.var(0), means + means**2 / th, rtol=0.08)
        np.testing.assert_allclose((draws == 0).mean(0), (th / (th + means)) ** th, atol=0.005)


def test_sparsity_is_realistic(adata):
    zeros = 1 - adata.X.nnz / (adata.n_obs * adata.n_vars)
    assert 0.70 <= zeros <= 0.95


def test_gene_means_span_orders_of_magnitude(dense):
    means = dense.mean(0)
    detected = means[means > 0]
    assert detected.max() > 5
    assert detected.max() / np.quantile(detected, 0.05) > 1e3


def test_counts_are_overdispersed_like_a_negative_binomial(adata, dense):
    # Controls of one type, so type shifts add no variance (donor shifts add ~0.01 to phi).
    cells = _mask(adata, perturbation=CONTROL, cell_type="type_A")
    mean, var = dense[cells].mean(0), dense[cells].var(0, ddof=1)
    high = mean > 1.0
    assert high.sum() >= 12
    assert (var[high] > mean[high]).mean() > 0.85  # overdispersed: not Poisson
    assert np.median(var[high] / mean[high]) > 1.3
    # Least-squares fit of var - mean = phi * mean^2: phi should be near 1/theta plus the library
    # size variance (log-normal sd 0.35 -> CV^2 ~ 0.13), i.e. a few tenths.
    phi = np.sum((var[high] - mean[high]) * mean[high] ** 2) / np.sum(mean[high] ** 4)
    true_phi = np.median(1 / adata.uns["simulation"]["dispersion_theta"][high])
    assert 0.5 * true_phi < phi < 1.0 + true_phi
    # Low-expressed genes are near-Poisson: the quadratic term is negligible there.
    low = (mean > 0.01) & (mean < 0.1)
    assert np.median(var[low] / mean[low]) < 1.3


def test_library_sizes_vary_between_cells(adata):
    cells = _mask(adata, perturbation=CONTROL, cell_type="type_A")
    lib = adata.obs.loc[cells, "n_counts"].to_numpy()
    assert lib.std() / lib.mean() > 0.25
    assert lib.max() / lib.min() > 3


def test_marker_genes_are_higher_in_their_type(adata, dense):
    for cell_type, markers in adata.uns["simulation"]["marker_genes"].items():
        genes = adata.var_names.get_indexer(list(markers))
        inside = _mask(adata, cell_type=cell_type)
        assert (_log_ratio(dense, inside, ~inside, genes) > 0.5).mean() >= 0.8, cell_type


def test_every_perturbation_in_every_type_and_donor(adata):
    counts = adata.obs.groupby(["perturbation", "cell_type", "donor"], observed=False).size()
    assert counts.min() >= 20


def test_knockdown_lowers_its_target(adata, dense):
    truth = adata.uns["simulation"]
    control = _mask(adata, perturbation=CONTROL)
    for target in truth["knockdowns"]["target"]:
        gene = adata.var_names.get_loc(target)
        for cell_type in truth["contexts"]:
            pert = _mask(adata, perturbation=target, cell_type=cell_type)
            ctrl = control & _mask(adata, cell_type=cell_type)
            assert dense[pert, gene].mean() < dense[ctrl, gene].mean(), (target, cell_type)


def test_knockdown_propagates_through_the_network(adata, dense):
    truth = adata.uns["simulation"]
    control = _mask(adata, perturbation=CONTROL)
    n_changed = []
    for i, target in enumerate(truth["knockdowns"]["target"]):
        lfc = np.abs(truth["true_lfc"][i].mean(0))  # average over types
        lfc[adata.var_names.get_loc(target)] = 0
        assert (lfc > 0.05).sum() >= 3, target  # even a weak knockdown moves a few other genes
        n_changed.append((lfc > 0.2).sum())
    assert max(n_changed) >= 10  # and the strong ones move tens
    # Strong downstream changes of detectable genes show up in the counts with the right sign,
    # type by type (edges are partly type-specific, so effects can differ between types).
    agree = []
    for i, target in enumerate(truth["knockdowns"]["target"]):
        for c, cell_type in enumerate(truth["contexts"]):
            ctrl = control & _mask(adata, cell_type=cell_type)
            lfc = truth["true_lfc"][i, c].copy()
            lfc[adata.var_names.get_loc(target)] = 0
            detectable = np.flatnonzero((np.abs(lfc) > 0.5) & (dense[ctrl].mean(0) > 0.3))
            observed = _log_ratio(dense, _mask(adata, perturbation=target, cell_type=cell_type), ctrl, detectable)
            agree.extend(np.sign(observed) == np.sign(lfc[detectable]))
    assert len(agree) >= 3 and np.mean(agree) >= 0.9
    assert set(truth["grn"]) >= {"source", "target", "weight"}
    assert set(truth["knockdowns"]["target"]) <= set(truth["grn"]["source"])


def test_stimulation_response_differs_by_type(adata, dense):
    truth = adata.uns["simulation"]
    program = truth["stimulations"]["STIM1"]
    lfc = truth["true_lfc"][list(truth["perturbations"]).index("STIM1")]  # (types, genes)
    observed = {}
    for cell_type in ("type_A", "type_B"):
        stim = _mask(adata, perturbation="STIM1", cell_type=cell_type)
        ctrl = _mask(adata, perturbation=CONTROL, cell_type=cell_type)
        observed[cell_type] = _log_ratio(dense, stim, ctrl, np.arange(adata.n_vars))
    # The shared program genes respond in both types.
    up = adata.var_names.get_indexer(list(program["up"]))
    assert np.median(observed["type_A"][up]) > 0.1 and np.median(observed["type_B"][up]) > 0.1
    # The response differs by type, in the truth and, where genes are detectable, in the counts.
    true_diff = lfc[0] - lfc[1]
    assert np.mean(np.abs(true_diff[np.abs(lfc[:2]).max(0) > 0.1])) > 0.3
    control_mean = dense[_mask(adata, perturbation=CONTROL)].mean(0)
    genes = np.flatnonzero((np.abs(true_diff) > 0.2) & (control_mean > 0.2))
    assert genes.size >= 5
    observed_diff = observed["type_A"][genes] - observed["type_B"][genes]
    assert np.corrcoef(observed_diff, true_diff[genes])[0, 1] > 0.5
    # Type-specific genes of type_A respond more in type_A than in type_B.
    specific = np.intersect1d(adata.var_names.get_indexer(list(program["context_specific"]["type_A"])), genes)
    if specific.size:
        assert np.mean(observed["type_A"][specific] - observed["type_B"][specific]) > 0.2


def test_ground_truth_is_present_and_consistent(adata):
    truth = adata.uns["simulation"]
    n_perts, n_types = 6, 3
    assert truth["true_lfc"].shape == (n_perts, n_types, adata.n_vars)
    assert truth["true_lfc"].dtype == np.float32
    assert list(truth["perturbations"]) == [p for p in adata.obs["perturbation"].cat.categories if p != CONTROL]
    assert truth["params"]["n_genes"] == 300 and truth["params"]["seed"] == 1
    assert truth["context_log_mean"].shape == (n_types, adata.n_vars)
    assert truth["donor_effects"].shape == (2, adata.n_vars)
    residual = truth["knockdowns"]["residual"]
    assert np.all((residual >= 0.1) & (residual <= 0.3))
    for i, target in enumerate(truth["knockdowns"]["target"]):
        gene = adata.var_names.get_loc(target)
        np.testing.assert_allclose(truth["true_lfc"][i, :, gene], np.log(residual[i]), rtol=1e-5)
        assert adata.var["mean_true"].iloc[gene] >= 0.3  # targets are reasonably expressed
    assert set(truth["marker_genes"]) == set(truth["contexts"])


def test_same_seed_same_counts_other_seed_differs():
    params = dict(n_genes=120, n_cells=400, n_knockdowns=3, n_markers_per_context=5)
    a = simulate_dataset(SimulationParams(**params, seed=7))
    b = simulate_dataset(SimulationParams(**params, seed=7))
    c = simulate_dataset(SimulationParams(**params, seed=8))
    assert (a.X != b.X).nnz == 0
    assert a.obs.equals(b.obs)
    assert (a.X != c.X).nnz > 0


def test_chunks_assemble_like_one_piece(monkeypatch):
    """Many tiny chunks give a valid CSR with the right shape (and the progress bar runs)."""
    import lingshu.data.simulate as sim

    monkeypatch.setattr(sim, "_CHUNK_ENTRIES", 120 * 7)
    out = simulate_dataset(SimulationParams(n_genes=120, n_cells=400, n_knockdowns=3, n_markers_per_context=5),
                           progress=True)
    out.X.check_format(full_check=True)
    assert out.shape == (400, 120) and out.X.has_sorted_indices


def test_params_from_dict_accepts_known_keys():
    params = params_from_dict({"n_knockdowns": 0, "n_stimulations": 3, "control_fraction": 0.25})
    assert params.n_stimulations == 3 and params.control_fraction == 0.25
    assert params.n_genes == SimulationParams().n_genes


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"n_knockdown": 3}, "n_knockdown"),  # unknown key (typo)
        ({"n_cells": "many"}, "n_cells"),
        ({"n_cells": True}, "n_cells"),
        ({"control_fraction": 1.5}, "control_fraction"),
        ({"n_genes": -5}, "n_genes"),
        ({"n_cells": 30}, "n_cells"),  # too few cells for every condition x type x donor
        ({"n_knockdowns": 0, "n_stimulations": 0}, "n_knockdowns"),
    ],
)
def test_params_from_dict_rejects_bad_input_naming_the_key(bad, key):
    with pytest.raises(InputError, match=key):
        params_from_dict(bad, source="config.yaml")


def test_h5ad_round_trip_keeps_ground_truth(adata, tmp_path):
    path = tmp_path / "sim.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert back.X.dtype == np.int32 and (back.X != adata.X).nnz == 0
    truth, orig = back.uns["simulation"], adata.uns["simulation"]
    np.testing.assert_array_equal(truth["true_lfc"], orig["true_lfc"])
    np.testing.assert_array_equal(truth["grn"]["weight"], orig["grn"]["weight"])
    assert list(truth["grn"]["source"]) == list(orig["grn"]["source"])
    assert list(truth["marker_genes"]["type_B"]) == list(orig["marker_genes"]["type_B"])
    assert truth["params"]["n_cells"] == 1500


def test_knockdown_only_dataset_round_trips(tmp_path):
    """No stimulations (the default) leaves empty ground-truth sections that must still serialise."""
    small = simulate_dataset(SimulationParams(n_genes=120, n_cells=300, n_knockdowns=2, n_markers_per_context=5))
    small.write_h5ad(tmp_path / "kd.h5ad")
    back = ad.read_h5ad(tmp_path / "kd.h5ad")
    assert list(back.uns["simulation"]["perturbation_kind"]) == ["knockdown", "knockdown"]
