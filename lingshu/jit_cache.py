"""Numba's compiled code kept on disk between jobs.

cell-eval's differential-expression tests (``pdex``, ``numba_mwu``) and the neighbour graphs
of its clustering metrics and of the report's UMAP (``umap``) are numba functions compiled
without numba's on-disk cache, so every evaluation job compiled the same code again: about 17
of an evaluate job's 21 CPU-seconds on the default pipeline (2 cores), 16 such jobs per run.
:func:`enable_numba_cache` turns numba's own cache on for those functions (numba's
``Dispatcher.enable_caching``): the first job compiles and writes the cache, the others load
it. The compiled code is the same either way, so the numbers are too.

The cache lives in ``$NUMBA_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/lingshu-bench/numba``
(``~/.cache/...``); numba keys each entry on the function's source file and signature, so an
upgraded package compiles afresh. Concurrent jobs may write it at once (numba writes each entry
to a temporary file and renames it).
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# Modules whose module-level numba functions have no cache of their own.
MODULES = ("numba_mwu", "pdex._math", "pdex", "umap.umap_", "umap.utils", "umap.layouts",
           "umap.sparse", "umap.distances")


def cache_dir() -> Path:
    """Where the compiled code is kept (see the module docstring)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lingshu-bench" / "numba"


def enable_numba_cache(modules: tuple[str, ...] = MODULES) -> int:
    """Turn numba's on-disk cache on for the module-level numba functions of ``modules``
    (those installed; the others are skipped). Returns how many functions it turned on; 0 when
    numba is missing or the cache folder cannot be written (a warning says so)."""
    try:
        import numba
        from numba.core.dispatcher import Dispatcher
    except ImportError:
        return 0
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        log.warning("numba cache off: cannot create %s (%s); set NUMBA_CACHE_DIR", folder, err)
        return 0
    numba.config.CACHE_DIR = str(folder)
    n = 0
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for obj in vars(module).values():
            if isinstance(obj, Dispatcher) and type(obj._cache).__name__ == "NullCache":
                obj.enable_caching()
                n += 1
    log.debug("numba cache on for %d functions in %s", n, folder)
    return n
