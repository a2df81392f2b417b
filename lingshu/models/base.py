"""The one interface every model implements.

A model never reads files or the config: it is built from its parameters, fitted on a
:class:`TrainingData` (raw counts of the training cells plus the perturbation features), and
asked, for one held-out condition, to predict ``n_cells`` cells given that context's real
control cells. Predictions are returned in log1p(CP10k) space (models that generate counts
normalise them with :func:`lingshu.data.normalize.log1p_cp10k`).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from lingshu.io import atomic_path


@dataclass
class TrainingData:
    """What a model sees at fit time.

    counts: (n_cells, n_genes) raw UMI counts of the training cells: a CSR matrix, or a
        :class:`lingshu.data.rows.CountRows` read on demand (the pipeline's jobs hand over the
        processed file's rows, so no model needs the whole matrix in memory). Models read it
        through :meth:`count_rows`.
    obs: (n_cells,) DataFrame with ``perturbation`` and ``context`` (controls are ``control``).
    genes: (n_genes,) gene symbols in the order of the columns.
    features: perturbation features for every perturbation the model may be asked about
        (index = perturbation label; see :mod:`lingshu.data.features`), or None.
    seed: the seed every random choice of the model derives from.
    targets: perturbation label -> its target genes that are in the panel (genetic
        perturbations; empty for stimulations and for targets outside the panel), for every
        perturbation of the dataset, held-out ones included (labels are known at prediction).
    perturbation_type: ``genetic`` or ``stimulation`` (the dataset entry's).
    workdir: a folder the model may keep resumable training state in (or None).
    threads: CPU threads the model may use.
    tokens: the training cells' count tokens on disk
        (:class:`lingshu.data.tokenstore.TokenStore`), for models whose spec says ``tokens``;
        ``counts`` is then None (never loaded).
    validation: held-out cells that no model trains on (the split's reference cells), in the
        same form (counts or tokens, obs), for a model's own diagnostics only, never to fit
        or to select anything; None when the split keeps none.
    """

    counts: Any
    obs: pd.DataFrame
    genes: np.ndarray
    features: pd.DataFrame | None
    seed: int = 0
    targets: dict[str, list[str]] = field(default_factory=dict)
    perturbation_type: str = "genetic"
    workdir: Path | None = None
    threads: int = 1
    tokens: Any = None
    validation: TrainingData | None = None

    def count_rows(self):
        """The training counts as :class:`lingshu.data.rows.CountRows` (blocks, batches)."""
        from lingshu.data.rows import as_count_rows

        return as_count_rows(self.counts)


@dataclass
class ConditionInput:
    """What a model sees to predict one held-out condition.

    context / perturbation: the labels of the condition.
    control_counts: (n_control, n_genes) CSR raw counts of that context's real control cells.
    n_cells: how many cells to predict.
    prior_genes: genes that the same perturbation strongly down-regulates in external data
        (other cell lines; :mod:`lingshu.data.prior`), when the dataset has a prior; models
        that inject priors (Lingshu-Cell with ``prior_injection``) use it, others ignore it.
    """

    context: str
    perturbation: str
    control_counts: sp.csr_matrix
    n_cells: int
    prior_genes: tuple[str, ...] = ()


class ConditionNotEncodable(ValueError):
    """A model cannot encode a condition (e.g. its context was never seen in training, or it
    has no control cells to start from).

    Raised by :meth:`PerturbationModel.predict`; the harness records the condition as not
    encoded by that model (the prediction file lists it, the evaluation scores the model on
    the other conditions and the report names it), rather than failing the run or dropping
    it silently. ``context``, ``perturbation`` and ``reason`` say which and why.
    """

    def __init__(self, context: str, perturbation: str, reason: str, model: str = "") -> None:
        self.context, self.perturbation, self.reason = context, perturbation, reason
        prefix = f"{model}: " if model else ""
        super().__init__(f"{prefix}cannot encode condition {context}/{perturbation}: {reason}")

    def record(self) -> dict[str, str]:
        return {"context": self.context, "perturbation": self.perturbation,
                "reason": self.reason}


class PerturbationModel(ABC):
    """Fit on training cells; predict held-out conditions; save and load its state.

    Subclasses set ``name`` and implement ``fit``, ``predict``, ``get_state`` and
    ``set_state``. State is a dict of numpy arrays plus a JSON-able dict, saved as ``.npz``
    without pickles so that a model file can be loaded safely.
    """

    name: ClassVar[str]
    # CPU threads the model may use at prediction (the predict job's; set by the caller).
    threads: int = 1
    # What a model measured about its own training (stage -> rows, e.g. Lingshu-Cell's
    # held-out bits per masked gene); saved with its state, copied into its predictions.
    diagnostics: dict[str, list[dict]] = {}

    def __init__(self, **params: Any) -> None:
        self.params = params

    @abstractmethod
    def fit(self, data: TrainingData) -> None:
        """Learn from the training cells."""

    @abstractmethod
    def predict(self, condition: ConditionInput, rng: np.random.Generator) -> np.ndarray:
        """Return (condition.n_cells, n_genes) float32 predicted log1p(CP10k) expression."""

    def predict_many(self, conditions: list[ConditionInput], rng: np.random.Generator,
                     progress: bool = False) -> Iterator[np.ndarray]:
        """Predict several conditions, in order; yields one array per condition, or the
        :class:`ConditionNotEncodable` raised for a condition the model cannot encode.

        The default calls :meth:`predict` for each; a model whose prediction has a high fixed
        cost (a subprocess, loading a large checkpoint) overrides this to pay it once.
        """
        for condition in tqdm(conditions, desc=f"predict {self.name}", disable=not progress):
            try:
                yield self.predict(condition, rng)
            except ConditionNotEncodable as err:
                yield err

    def set_sampling(self, params: dict[str, Any]) -> None:
        """Apply a run's sampling settings (its spec's ``sampling_keys``, e.g. guidance) to a
        fitted or pre-trained model, before it predicts or generates.

        The default sets them in ``self.cfg``, the settings dict of models that have one.
        """
        if not params:
            return
        cfg = getattr(self, "cfg", None)
        unknown = sorted(set(params) - set(cfg or {}))
        if cfg is None or unknown:
            raise ValueError(f"{self.name}: {unknown or sorted(params)} are not settings of "
                             "this model")
        cfg.update(params)

    def generate(self, n_cells: int, rng: np.random.Generator,
                 progress: bool = False) -> np.ndarray:
        """Return (n_cells, n_genes) raw counts of unconditionally generated cells.

        Only generative models (their spec's ``generates_from``) implement it.
        """
        raise NotImplementedError(f"{self.name} does not generate cells unconditionally")

    @abstractmethod
    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Return (arrays, meta) that :meth:`set_state` restores."""

    @abstractmethod
    def set_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Restore what :meth:`get_state` returned."""

    def save(self, path: str | Path) -> None:
        """Write the fitted model atomically to ``path`` (.npz)."""
        arrays, meta = self.get_state()
        meta = {"model": self.name, "params": self.params, **meta}
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, __meta__=np.array(json.dumps(meta)), **arrays)


def is_main_process() -> bool:
    """True unless this is a rank other than 0 of a ``torchrun`` launch (``RANK`` > 0): the
    process that writes a job's outputs."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def data_fingerprint(data: TrainingData, **extra: Any) -> str:
    """A short hash of the training inputs (counts, labels, genes, features, seed) plus any
    ``extra`` JSON-able values (parameters, the hash of initial weights).

    Resumable training state carries it, so that state left in a model's folder by a run on
    other inputs is never resumed as if it were this run's.
    """
    import hashlib

    h = hashlib.sha256()
    if data.counts is None:  # tokens on disk: their stored hash and the rows
        h.update(data.tokens.fingerprint().encode())
        h.update(repr(data.tokens.shape).encode())
    else:
        h.update(data.count_rows().fingerprint().encode())
    for col in sorted(data.obs.columns):
        h.update(col.encode())
        h.update("\x1f".join(map(str, data.obs[col].to_numpy())).encode())
    h.update("\x1f".join(map(str, data.genes)).encode())
    if data.features is not None:
        h.update(data.features.to_csv().encode())
    h.update(json.dumps({"seed": data.seed, **extra}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def model_workdir(path: str | Path | None, prefix: str) -> Iterator[Path]:
    """A model's folder for training files: ``path`` (created), or a temporary folder that
    is removed afterwards when the caller gave none."""
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def load_state(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read (arrays, meta) from a file written by :meth:`PerturbationModel.save`, without
    executing code (``allow_pickle=False``: numeric arrays and JSON only).

    Raises :class:`~lingshu.errors.CorruptFileError`, naming the file and saying to delete it
    and re-run its fit rule, when it is truncated, corrupt, holds pickled objects or lacks its
    metadata (FileNotFoundError for a missing file).
    """
    from lingshu.errors import corrupt_file_error

    try:
        with np.load(path, allow_pickle=False) as npz:
            if not hasattr(npz, "files"):
                raise ValueError("it holds one array, not the arrays of a model")
            meta = json.loads(str(npz["__meta__"]))
            arrays = {k: npz[k] for k in npz.files if k != "__meta__"}
        if not isinstance(meta, dict) or "model" not in meta:
            raise ValueError("its metadata does not name a model")
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as err:  # noqa: BLE001 - numpy / zipfile raise many kinds for a bad file
        raise corrupt_file_error(path, "a model file (model.npz)", err) from err
    return arrays, meta
