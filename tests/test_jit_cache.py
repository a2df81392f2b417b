"""Numba functions without a cache of their own get numba's on-disk cache."""

import importlib
import sys

from lingshu.jit_cache import cache_dir, enable_numba_cache

MODULE = '''
import numba

@numba.njit
def total(x):
    s = 0.0
    for v in x:
        s += v
    return s
'''


def test_an_uncached_numba_function_writes_its_compiled_code_to_the_cache(tmp_path, monkeypatch):
    import numba
    import numpy as np

    before = numba.config.CACHE_DIR
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "jitted_for_test.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "cache"))
    module = importlib.import_module("jitted_for_test")
    try:
        assert cache_dir() == tmp_path / "cache"
        assert enable_numba_cache(("jitted_for_test", "no_such_module_here")) == 1
        assert module.total(np.arange(4.0)) == 6.0
        written = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
        assert any(n.endswith(".nbi") for n in written) and any(n.endswith(".nbc") for n in written)
        assert enable_numba_cache(("jitted_for_test",)) == 0  # already on
    finally:
        sys.modules.pop("jitted_for_test", None)
        numba.config.CACHE_DIR = before
