"""Atomic writes: all or nothing, and the permissions of an ordinary file."""

import os
import stat

import pytest

from lingshu.io import atomic_path


def test_atomic_path_writes_with_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "out.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out.txt").read_text() == "x"
    assert stat.S_IMODE((tmp_path / "out.txt").stat().st_mode) == 0o644


def test_atomic_path_leaves_nothing_when_the_block_fails(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_write_h5ad_writes_pandas_string_dtype_text(tmp_path):
    """Text in pandas' string dtype (pandas 3's default; ``future.infer_string`` here), which
    anndata refuses to write by default, is written and reads back equal;
    the AnnData written is left as it was."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    from lingshu.io import write_h5ad

    with pd.option_context("future.infer_string", True):
        obs = pd.DataFrame({"perturbation": ["A", "B", "A"], "n": [1, 2, 3]},
                           index=pd.Index(["c1", "c2", "c3"]))
        var = pd.DataFrame(index=pd.Index(["g1", "g2"]))
        adata = ad.AnnData(np.arange(6, dtype=np.float32).reshape(3, 2), obs=obs, var=var)
        assert isinstance(adata.obs.index.dtype, pd.StringDtype)  # the case being tested
        with pytest.raises(RuntimeError, match="nullable_strings"):  # what anndata does alone
            adata.write_h5ad(tmp_path / "plain.h5ad")
        before = adata.obs.dtypes.copy(), adata.obs.index.dtype
        write_h5ad(adata, tmp_path / "x.h5ad")
        assert adata.obs.dtypes.equals(before[0]) and adata.obs.index.dtype == before[1]
    back = ad.read_h5ad(tmp_path / "x.h5ad")
    assert list(back.obs_names) == ["c1", "c2", "c3"] and list(back.var_names) == ["g1", "g2"]
    assert list(back.obs["perturbation"]) == ["A", "B", "A"] and list(back.obs["n"]) == [1, 2, 3]
    np.testing.assert_array_equal(back.X, adata.X)
