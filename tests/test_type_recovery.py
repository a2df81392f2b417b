"""benchmarks/type_recovery.py: do generated cells commit to a cell type, and does a model read
the type off a few kept genes as well as naive Bayes does?"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from lingshu.data.normalize import log1p_cp10k
from lingshu.evaluate.fidelity import celltype_classifier
from lingshu.tokens import N_EXPR_TOKENS

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "type_recovery.py"


@pytest.fixture(scope="module")
def tr():
    spec = importlib.util.spec_from_file_location("type_recovery", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def two_types(n, seed):
    """Type A expresses genes 0-19 (Poisson 8) and barely 20-39 (Poisson 0.2); B the reverse."""
    rng = np.random.default_rng(seed)
    labels = np.array(["A", "B"])[rng.integers(0, 2, n)]
    high = (labels == "A")[:, None] == (np.arange(40) < 20)[None, :]
    return rng.poisson(np.where(high, 8.0, 0.2)).astype(np.int64), labels


@pytest.fixture(scope="module")
def setup(tr):
    train, train_labels = two_types(400, 0)
    real, labels = two_types(60, 1)
    clf = celltype_classifier(log1p_cp10k(train.astype(np.float32)), train_labels, 0)
    nb = tr.naive_bayes_tables(train, train_labels, [str(c) for c in clf.classes_])
    return train, real, labels, clf, nb


def test_naive_bayes_reads_the_type_from_the_kept_genes_only(tr, setup):
    _, real, labels, clf, nb = setup
    truth = np.array([list(clf.classes_).index(c) for c in labels])
    every = np.ones_like(real, dtype=bool)
    assert np.mean(tr.naive_bayes_predict(*nb, real, every) == truth) == 1.0
    none = np.zeros_like(real, dtype=bool)  # the prior alone: one class for every cell
    assert len(set(tr.naive_bayes_predict(*nb, real, none))) == 1


def _oracle(real):
    """A model that knows each cell: all its mass on the real cell's own token."""
    logits = torch.full((*real.shape, N_EXPR_TOKENS), -30.0)
    logits.scatter_(2, real.unsqueeze(-1), 0.0)
    return lambda x, _c, select=None: logits[select] if select is not None else logits


def _marginal(train, n_cells):
    """A model that knows each gene's pooled token distribution and nothing of cell types."""
    counts = np.stack([(np.minimum(train, N_EXPR_TOKENS - 1) == v).sum(0)
                       for v in range(N_EXPR_TOKENS)], axis=1) + 1e-3
    logp = torch.as_tensor(np.log(counts / counts.sum(1, keepdims=True)), dtype=torch.float32)
    logits = logp.expand(n_cells, -1, -1)
    return lambda x, _c, select=None: logits[select] if select is not None else logits


def test_recovery_tells_a_model_that_commits_from_one_that_mixes_types(tr, setup):
    train, real, labels, clf, nb = setup
    tokens = torch.as_tensor(real)
    kw = dict(classifier=clf, nb=nb, fractions=[0.0, 0.05, 0.3], steps=4, seed=0)
    exact = tr.recovery(_oracle(tokens), tokens, labels, **kw).set_index("cells")
    assert exact.loc["kept 0.3", "own_type"] == 1.0 and exact.loc["kept 0", "own_type"] == 1.0
    assert exact.loc["kept 0", "ambiguous"] == 0.0 and exact.loc["kept 0", "max_prob"] > 0.95
    mixed = tr.recovery(_marginal(train, len(real)), tokens, labels, **kw).set_index("cells")
    # cells drawn gene by gene from the pooled marginal carry half of each type's genes
    assert mixed.loc["kept 0", "max_prob"] < exact.loc["kept 0", "max_prob"] - 0.2
    assert mixed.loc["kept 0.05", "own_type"] < exact.loc["kept 0.05", "own_type"] - 0.1
    assert (exact["naive_bayes"] == mixed["naive_bayes"]).all()  # the same kept genes
    assert exact.loc["kept 0.3", "naive_bayes"] > 0.9
