"""STATE (Arc Institute's State Transition model) as a benchmark model, run by ``arc-state``.

Nothing of STATE is re-implemented here: this adapter converts the pipeline's data into what
``state tx train`` and ``state tx infer`` expect, runs them as subprocesses with Hydra
overrides, and converts their output back (SPEC 3).

Training (``fit``)
    The training cells are written as log1p(CP10k) to ``train.h5ad`` with categorical obs
    columns ``perturbation`` / ``context`` (cell-load's cell-type key) / ``batch``, and a
    cell-load TOML that names that file as the one training dataset. The held-out cells and
    the test contexts' control input cells are never written there (the cell-load fewshot
    split would put every control cell into training), and no validation split is declared,
    so that no checkpoint is chosen on held-out data: the run's ``final.ckpt`` is used.
    ``model.kwargs.dropout`` is set to 0 (SPEC 3: the base-class default of 0.1 breaks
    inference), ``use_wandb=false``, no dataloader workers.

Perturbation encoding (SPEC 1.2a)
    ``onehot`` (cell-load's default) only works for perturbations seen in training; a
    held-out perturbation would get an untrained column, so it is refused with an error.
    ``features`` hands STATE a ``perturbation_features_file``: each perturbation's shared
    features (target-gene PCA loadings or a user feature file) plus one flag for the shared
    "unknown perturbation" embedding; control is the zero vector. ``auto`` picks ``onehot``
    when every perturbation the model may be asked about was seen in training (held-out
    combinations) and ``features`` otherwise (held-out perturbations).

Prediction (``predict_many``)
    One ``state tx infer`` call per prediction job: an input AnnData holds each test context's
    real control input cells plus, for every condition, as many rows as cells to predict,
    labelled with the perturbation. STATE samples its own basal control cells from the
    context's controls, writes predictions to ``X`` (clipped to [0, 14]) and also rewrites
    the control rows; only the perturbed rows are taken, and the pipeline appends the real
    control cells as for every model.

The fitted model (``model.npz``) carries the run's files (``config.yaml``, the one-hot maps,
``var_dims.pkl`` and ``final.ckpt`` without optimiser state) as byte arrays, so that it is one
file like every other model. Those files are STATE's own formats (torch and pickle) and are
read by STATE's code at prediction time.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from lingshu.constants import BATCH_COL, CONTEXT_COL, CONTROL, PERT_COL
from lingshu.data.features import SOURCE_COL
from lingshu.data.normalize import log1p_cp10k
from lingshu.errors import CorruptFileError
from lingshu.io import atomic_path, write_h5ad, write_h5ad_streaming
from lingshu.models.base import (
    ConditionInput,
    PerturbationModel,
    TrainingData,
    model_workdir,
)

log = logging.getLogger(__name__)

# Model sizes. ``tiny`` is for tests, ``cpu`` for the default pipeline on 2 CPU cores,
# ``state_sm`` and ``state`` are upstream's model configs unchanged (for a GPU).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"model": "state_sm", "hidden_dim": 32, "layers": 1, "heads": 2, "mlp_layers": 1,
             "cell_set_len": 16, "batch_size": 4, "steps": 30, "lr": 1e-3},
    "cpu": {"model": "state_sm", "hidden_dim": 128, "layers": 2, "heads": 4, "mlp_layers": 2,
            "cell_set_len": 32, "batch_size": 8, "steps": 500, "lr": 1e-3},
    "state_sm": {"model": "state_sm", "batch_size": 16, "steps": 40000, "lr": 1e-4},
    "state": {"model": "state", "batch_size": 16, "steps": 80000, "lr": 1e-4},
}

DEFAULTS: dict[str, Any] = {
    "preset": "cpu",
    "steps": None,  # None: the preset's
    "batch_size": None,
    "lr": None,
    "cell_set_len": None,
    "hidden_dim": None,
    "perturbation_encoding": "auto",  # auto | onehot | features
    "overrides": [],  # further Hydra overrides passed to `state tx train` as they are
    "timeout_s": None,  # a limit on each STATE subprocess (None: none)
    "keep_training_files": False,  # keep the dense training h5ad and STATE's checkpoints
}

ENCODINGS = ("auto", "onehot", "features")
UNKNOWN_FLAG = "unknown_perturbation"
RUN_NAME = "run"
CKPT = "checkpoints/final.ckpt"
RUN_FILES = ("config.yaml", "var_dims.pkl", "pert_onehot_map.pt", "batch_onehot_map.torch",
             "cell_type_onehot_map.torch", CKPT)


class StateError(RuntimeError):
    """STATE cannot do what it was asked, or its run failed."""


def state_available() -> bool:
    """Whether the ``arc-state`` package can be imported here."""
    import importlib.util

    return importlib.util.find_spec("state") is not None and \
        importlib.util.find_spec("cell_load") is not None


def _categorical(values, categories) -> pd.Categorical:
    return pd.Categorical(np.asarray(values).astype(str), categories=sorted(set(categories)))


def _run(cmd: list[str], log_path: Path, threads: int, timeout: float | None,
         what: str) -> None:
    """Run a STATE command, its output going to ``log_path`` (and echoed on failure)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "WANDB_MODE": "disabled", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    log.info("%s: %s", what, " ".join(cmd))
    start = time.perf_counter()
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                text=True, bufsize=1)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                fh.write(line)
                # STATE's progress bars and step logs go to our log as they come.
                sys.stderr.write(line)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise StateError(f"{what} ran past timeout_s={timeout}; "
                             f"its log is {log_path}") from None
    if proc.returncode != 0:
        tail = "".join(Path(log_path).read_text().splitlines(keepends=True)[-40:])
        raise StateError(f"{what} failed with exit status {proc.returncode}; its log is "
                         f"{log_path}. Last lines:\n{tail}")
    log.info("%s took %.1f s", what, time.perf_counter() - start)


def _plain(value: Any) -> Any:
    """Numpy scalars -> Python numbers, recursively (Lightning's checkpoint loading under
    torch >= 2.6 refuses numpy scalars, which arc-state 0.11.1 leaves in its hyperparameters)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


# What arc-state's files may hold besides tensors and plain containers: numpy scalars and
# their dtypes (e.g. np.str_ keys of its one-hot maps, numbers in its hyperparameters).
_NUMPY_MODULES = ("numpy", "numpy.dtypes", "numpy.core.multiarray", "numpy._core.multiarray")


def _numpy_globals() -> list:
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    dtypes = {type(np.dtype(t)) for t in (np.str_, np.bytes_, np.bool_, np.int8, np.int16,
                                           np.int32, np.int64, np.uint8, np.float16,
                                           np.float32, np.float64)}
    return [scalar, np.dtype, *sorted(dtypes, key=lambda t: t.__name__)]


def _torch_load(source: Path | io.BytesIO):
    """``torch.load`` of one of STATE's files without executing code: ``weights_only=True``,
    numpy scalars and dtypes allowed (arc-state leaves them in its files)."""
    import torch

    with torch.serialization.safe_globals(_numpy_globals()):
        return torch.load(source, map_location="cpu", weights_only=True)


class _DataUnpickler(pickle.Unpickler):
    """Unpickles data only (containers, strings, numbers, numpy scalars): any other global,
    which is how a pickle runs code, is refused."""

    def find_class(self, module: str, name: str):
        if module in _NUMPY_MODULES and (name in ("scalar", "dtype") or name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed (data only)")


def _check_packed_files(files: dict[str, bytes]) -> None:
    """Refuse STATE run files (from a model.npz) that hold more than data: ``state tx infer``
    unpickles some of them with ``weights_only=False`` or ``pickle.load``, so each one is read
    here first as data only (CorruptFileError otherwise)."""
    for name, blob in files.items():
        try:
            if name.endswith(".pkl"):
                _DataUnpickler(io.BytesIO(blob)).load()
            elif name.endswith((".pt", ".torch", ".ckpt")):
                _torch_load(io.BytesIO(blob))
        except Exception as err:  # noqa: BLE001 - pickle / torch raise many kinds
            raise CorruptFileError(f"STATE's packed file {name!r} cannot be read as data only "
                                   f"({type(err).__name__}: {str(err).splitlines()[0][:300]})"
                                   ) from err
        if name in RUN_FILES or name == CKPT:
            continue
        raise CorruptFileError(f"it packs an unexpected STATE file {name!r}")


class StateModel(PerturbationModel):
    """STATE trained and run by its own package (``state tx train`` / ``state tx infer``)."""

    name = "state"

    def __init__(self, **params: Any) -> None:
        unknown = set(params) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"state: unknown parameters {sorted(unknown)}; "
                             f"known: {sorted(DEFAULTS)}")
        super().__init__(**params)
        self.cfg = {**DEFAULTS, **params}
        if self.cfg["preset"] not in PRESETS:
            raise ValueError(f"state: unknown preset {self.cfg['preset']!r}; "
                             f"choose one of {sorted(PRESETS)}")
        if self.cfg["perturbation_encoding"] not in ENCODINGS:
            raise ValueError(f"state: perturbation_encoding must be one of {ENCODINGS}, got "
                             f"{self.cfg['perturbation_encoding']!r}")
        self.files: dict[str, bytes] = {}

    # ------------------------------------------------------------------ configuration
    def setting(self, key: str) -> Any:
        """A training setting: the config's value, else the preset's."""
        value = self.cfg.get(key)
        return PRESETS[self.cfg["preset"]].get(key) if value is None else value

    def hydra_overrides(self, toml: Path, outdir: Path, seed: int,
                        features_file: Path | None) -> list[str]:
        """The overrides of ``state tx train`` for this preset and these files."""
        p = PRESETS[self.cfg["preset"]]
        steps = int(self.setting("steps"))
        o = [
            f"model={p['model']}",
            f"data.kwargs.toml_config_path={toml}",
            "data.kwargs.embed_key=null",
            "data.kwargs.output_space=gene",
            f"data.kwargs.pert_col={PERT_COL}",
            f"data.kwargs.cell_type_key={CONTEXT_COL}",
            f"data.kwargs.batch_col={BATCH_COL}",
            f"data.kwargs.control_pert={CONTROL}",
            "data.kwargs.num_workers=0",
            "data.kwargs.pin_memory=false",
            f"+data.kwargs.random_seed={seed}",
            f"training.train_seed={seed}",
            f"training.max_steps={steps}",
            f"training.batch_size={int(self.setting('batch_size'))}",
            f"training.lr={float(self.setting('lr'))}",
            # No validation split exists (held-out data never reaches STATE's training run);
            # checkpoints by step count only, the final one used.
            f"training.val_freq={steps + 1}",
            f"training.ckpt_every_n_steps={steps + 1}",
            "+model.kwargs.dropout=0.0",
            "+training.log_every_n_steps=1",  # a loss per step for the loss curve
            "use_wandb=false",
            f"output_dir={outdir}",
            f"name={RUN_NAME}",
            "overwrite=true",
        ]
        if features_file is not None:
            o.append(f"data.kwargs.perturbation_features_file={features_file}")
        if self.setting("cell_set_len") is not None:
            o.append(f"model.kwargs.cell_set_len={int(self.setting('cell_set_len'))}")
        if self.setting("hidden_dim") is not None:
            hidden = int(self.setting("hidden_dim"))
            heads = int(p.get("heads", 8))
            if hidden % heads:
                raise ValueError(f"state: hidden_dim {hidden} must be a multiple of the "
                                 f"preset's {heads} attention heads")
            o += [f"model.kwargs.hidden_dim={hidden}",
                  f"model.kwargs.transformer_backbone_kwargs.intermediate_size={2 * hidden}",
                  f"model.kwargs.transformer_backbone_kwargs.num_attention_heads={heads}",
                  f"model.kwargs.transformer_backbone_kwargs.num_key_value_heads={heads}",
                  f"model.kwargs.transformer_backbone_kwargs.head_dim={hidden // heads}"]
        if "layers" in p:
            o.append(f"model.kwargs.transformer_backbone_kwargs.num_hidden_layers={p['layers']}")
        if "mlp_layers" in p:
            o += [f"model.kwargs.n_encoder_layers={p['mlp_layers']}",
                  f"model.kwargs.n_decoder_layers={p['mlp_layers']}"]
        return o + [str(x) for x in self.cfg["overrides"]]

    def choose_encoding(self, data: TrainingData) -> str:
        """``onehot`` or ``features`` for this data (see the module docstring)."""
        seen = set(data.obs[PERT_COL].astype(str))
        asked = sorted(set(data.targets) - {CONTROL}) if data.targets else sorted(seen)
        unseen = [p for p in asked if p not in seen]
        encoding = self.cfg["perturbation_encoding"]
        if encoding == "auto":
            encoding = "features" if unseen else "onehot"
        if encoding == "onehot" and unseen:
            raise StateError(
                f"state: perturbation_encoding 'onehot' gives STATE no trained encoding for "
                f"{len(unseen)} perturbation(s) that no training cell carries "
                f"({', '.join(unseen[:5])}{', ...' if len(unseen) > 5 else ''}). Fix: set "
                f"perturbation_encoding: features (or auto) in the state model block")
        if encoding == "features" and data.features is None:
            raise StateError("state: perturbation_encoding 'features' needs the dataset's "
                             "perturbation features (features.tsv), and none were given")
        return encoding

    @staticmethod
    def feature_vectors(features: pd.DataFrame, labels: list[str]) -> dict[str, np.ndarray]:
        """Perturbation label -> STATE's feature vector: the shared features plus an
        "unknown" flag (1 for perturbations without features); control is all zeros."""
        cols = [c for c in features.columns if c != SOURCE_COL]
        missing = [p for p in labels if p != CONTROL and p not in features.index]
        if missing:
            raise StateError(f"state: the perturbation features hold no row for "
                             f"{', '.join(missing[:5])}; the features rule writes one for "
                             f"every perturbation, so rerun it")
        out = {CONTROL: np.zeros(len(cols) + 1, dtype=np.float32)}
        for p in labels:
            if p == CONTROL:
                continue
            row = features.loc[p]
            unknown = str(row.get(SOURCE_COL, "")) == "unknown"
            vec = np.zeros(len(cols) + 1, dtype=np.float32)
            if unknown:
                vec[-1] = 1.0
            else:
                vec[:-1] = row[cols].to_numpy(dtype=np.float32)
            out[p] = vec
        return out

    # ------------------------------------------------------------------ training
    def fit(self, data: TrainingData) -> None:
        if not state_available():
            raise StateError("state: the arc-state package is not installed. Fix: pip install "
                             "-e '.[state]' (or use envs/state.yaml)")
        if CONTROL not in set(data.obs[PERT_COL]):
            raise StateError("state: the training cells hold no control cells; STATE maps "
                             "every perturbed cell to a control cell of its context")
        with model_workdir(data.workdir, "state_") as workdir:
            self._fit_in(data, workdir)

    def _fit_in(self, data: TrainingData, workdir: Path) -> None:
        import torch

        root = workdir / "state"
        root.mkdir(parents=True, exist_ok=True)
        self.threads = max(1, int(data.threads))
        self.genes = [str(g) for g in data.genes]
        self.encoding = self.choose_encoding(data)
        labels = sorted(set(data.obs[PERT_COL].astype(str)) | set(data.targets) | {CONTROL})

        # Training file: log1p(CP10k), categorical obs with every label of the dataset as a
        # category (one-hot maps are built from categories, not from the cells present).
        obs = pd.DataFrame({
            PERT_COL: _categorical(data.obs[PERT_COL], labels),
            CONTEXT_COL: _categorical(data.obs[CONTEXT_COL], data.obs[CONTEXT_COL]),
            BATCH_COL: _categorical(data.obs[BATCH_COL] if BATCH_COL in data.obs
                                    else data.obs[CONTEXT_COL],
                                    data.obs[BATCH_COL] if BATCH_COL in data.obs
                                    else data.obs[CONTEXT_COL]),
        }, index=[f"cell{i}" for i in range(len(data.obs))])
        # Dense: cell-load reads one cell at a time, and CSR rows through h5py made training
        # about 10x slower on a CPU (0.9 against 9 steps/s at the tiny preset). Written block
        # by block: the training cells are never all in memory here.
        train_path = root / "train.h5ad"
        with atomic_path(train_path) as tmp:
            write_h5ad_streaming(tmp, obs=obs, var=pd.DataFrame(index=self.genes),
                                 blocks=(log1p_cp10k(block) for _, block
                                         in data.count_rows().blocks()),
                                 dtype=np.float32, dense=True)
        toml = root / "split.toml"
        toml.write_text(f'[datasets]\ntrain = "{train_path.resolve()}"\n\n'
                        f'[training]\ntrain = "train"\n')

        features_file = None
        if self.encoding == "features":
            vectors = self.feature_vectors(data.features, labels)
            features_file = root / "perturbation_features.pt"
            torch.save({k: torch.from_numpy(v) for k, v in vectors.items()}, features_file)
            n_unknown = sum(bool(v[-1]) for v in vectors.values())
            log.info("state: perturbation features of dimension %d (%d of %d perturbations "
                     "share the unknown-perturbation flag)", len(next(iter(vectors.values()))),
                     n_unknown, len(vectors) - 1)

        outdir = root / "runs"
        cmd = [sys.executable, "-m", "state", "tx", "train",
               *self.hydra_overrides(toml.resolve(), outdir.resolve(), data.seed,
                                     features_file.resolve() if features_file else None)]
        start = time.perf_counter()
        _run(cmd, root / "train.log", self.threads, self.cfg["timeout_s"], "state tx train")
        self.train_seconds = time.perf_counter() - start
        self.final_loss = self._loss_curve(outdir / RUN_NAME, root / "train_loss.png")
        self.files = self._pack(outdir / RUN_NAME)
        if not self.cfg["keep_training_files"]:
            # The dense copy of the training cells and the checkpoints (with optimiser state)
            # are large; model.npz holds what prediction needs. Logs and metrics stay.
            train_path.unlink()
            shutil.rmtree(outdir / RUN_NAME / "checkpoints", ignore_errors=True)
        self.labels = sorted(self._perturbation_map_labels())
        self.contexts = sorted(set(data.obs[CONTEXT_COL].astype(str)))

    @staticmethod
    def _loss_curve(run_dir: Path, png: Path) -> float | None:
        """Plot STATE's logged training loss (its CSV logger's metrics.csv) to ``png``;
        return the last logged loss (None when nothing was logged)."""
        from lingshu.models.training import plot_loss_curve

        logs = sorted(run_dir.glob("version_*/metrics.csv"))
        if not logs:
            log.warning("state: no metrics.csv under %s; no loss curve", run_dir)
            return None
        table = pd.read_csv(logs[-1])
        if "train_loss" not in table:
            return None
        losses = table["train_loss"].dropna().astype(float).tolist()
        if not losses:
            return None
        plot_loss_curve(losses, png, title="STATE training loss (energy distance)")
        log.info("state: training loss %.4f at the first log, %.4f at the last", losses[0],
                 losses[-1])
        return losses[-1]

    def _pack(self, run_dir: Path) -> dict[str, bytes]:
        """The run's files needed by ``state tx infer``; the checkpoint without optimiser
        state (what Lightning needs to rebuild the module is kept)."""
        import torch

        files = {}
        for name in RUN_FILES:
            path = run_dir / name
            if not path.exists():
                raise StateError(f"state tx train wrote no {path}; see "
                                 f"{run_dir.parent.parent / 'train.log'}")
            if name == CKPT:
                ckpt = _torch_load(path)
                for key in ("optimizer_states", "lr_schedulers", "callbacks", "loops"):
                    ckpt.pop(key, None)
                ckpt["hyper_parameters"] = _plain(ckpt.get("hyper_parameters", {}))
                buf = io.BytesIO()
                torch.save(ckpt, buf)
                files[name] = buf.getvalue()
            else:
                files[name] = path.read_bytes()
        return files

    def _perturbation_map_labels(self) -> list[str]:
        mapping = _torch_load(io.BytesIO(self.files["pert_onehot_map.pt"]))
        return [str(k) for k in mapping]

    def _materialise(self, where: Path) -> Path:
        run_dir = where / RUN_NAME
        for name, blob in self.files.items():
            path = run_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
        return run_dir

    # ------------------------------------------------------------------ prediction
    def predict(self, condition: ConditionInput, rng: np.random.Generator) -> np.ndarray:
        return self.predict_many([condition], rng)[0]

    def predict_many(self, conditions: list[ConditionInput], rng: np.random.Generator,
                     progress: bool = False) -> list[np.ndarray]:
        if not self.files:
            raise StateError("state: predict before fit (the model holds no STATE run)")
        if not state_available():
            raise StateError("state: the arc-state package is not installed. Fix: pip install "
                             "-e '.[state]' (or use envs/state.yaml)")
        known = set(self.labels)
        for c in conditions:
            if c.perturbation not in known:
                # `state tx infer` would silently use the control encoding instead.
                raise StateError(
                    f"state: STATE has no encoding for perturbation {c.perturbation!r} "
                    f"(its map holds {len(known)} labels); refit the model on a split that "
                    f"lists it")
            if c.control_counts.shape[0] == 0:
                raise StateError(f"state: no control cells for context {c.context!r}; STATE "
                                 f"predicts from a context's control cells")
        blocks, obs, rows = [], [], []
        by_context: dict[str, sp.csr_matrix] = {}
        for c in conditions:
            if c.context not in by_context:
                by_context[c.context] = c.control_counts
            elif by_context[c.context].shape != c.control_counts.shape:
                raise StateError(f"state: conditions of context {c.context!r} came with "
                                 f"different control cells")
        n = 0
        for ctx, counts in by_context.items():
            blocks.append(sp.csr_matrix(log1p_cp10k(counts), dtype=np.float32))
            obs.append(pd.DataFrame({PERT_COL: CONTROL, CONTEXT_COL: ctx, BATCH_COL: ctx},
                                    index=range(counts.shape[0])))
            n += counts.shape[0]
        for c in conditions:
            ctrl = by_context[c.context]
            # Placeholder rows for the cells to predict: copies of control cells, which
            # STATE replaces by its prediction from its own sample of the context's controls.
            pick = rng.integers(ctrl.shape[0], size=c.n_cells)
            blocks.append(sp.csr_matrix(log1p_cp10k(ctrl[pick]), dtype=np.float32))
            obs.append(pd.DataFrame({PERT_COL: c.perturbation, CONTEXT_COL: c.context,
                                     BATCH_COL: c.context}, index=range(c.n_cells)))
            rows.append(np.arange(n, n + c.n_cells))
            n += c.n_cells
        obs_df = pd.concat(obs, ignore_index=True)
        obs_df.index = [f"c{i}" for i in range(len(obs_df))]
        for col in obs_df:
            obs_df[col] = obs_df[col].astype("category")
        seed = int(rng.integers(2**31 - 1))
        with tempfile.TemporaryDirectory(prefix="state_infer_") as tmp:
            tmp = Path(tmp)
            run_dir = self._materialise(tmp)
            src, out = tmp / "input.h5ad", tmp / "output.h5ad"
            write_h5ad(ad.AnnData(X=sp.vstack(blocks, format="csr"), obs=obs_df,
                                  var=pd.DataFrame(index=self.genes)), src)
            cmd = [sys.executable, "-m", "state", "tx", "infer", "--model-dir", str(run_dir),
                   "--checkpoint", str(run_dir / CKPT), "--adata", str(src),
                   "--output", str(out), "--pert-col", PERT_COL, "--celltype-col", CONTEXT_COL,
                   "--control-pert", CONTROL, "--seed", str(seed)]
            start = time.perf_counter()
            _run(cmd, tmp / "infer.log", self.threads, self.cfg["timeout_s"], "state tx infer")
            self.infer_seconds = time.perf_counter() - start
            result = ad.read_h5ad(out)
        if result.n_obs != n or result.n_vars != len(self.genes):
            raise StateError(f"state tx infer returned {result.shape}; expected "
                             f"{(n, len(self.genes))}")
        x = result.X.toarray() if sp.issparse(result.X) else np.asarray(result.X)
        return [np.asarray(x[r], dtype=np.float32) for r in rows]

    # ------------------------------------------------------------------ state
    def get_state(self):
        arrays = {f"file::{name}": np.frombuffer(blob, dtype=np.uint8)
                  for name, blob in self.files.items()}
        meta = {"genes": self.genes, "labels": self.labels, "contexts": self.contexts,
                "encoding": self.encoding, "train_seconds": getattr(self, "train_seconds", None),
                "final_loss": getattr(self, "final_loss", None)}
        return arrays, meta

    def set_state(self, arrays, meta):
        self.files = {k[len("file::"):]: v.tobytes() for k, v in arrays.items()
                      if k.startswith("file::")}
        _check_packed_files(self.files)  # before `state tx infer` unpickles any of them
        self.genes, self.labels = meta["genes"], meta["labels"]
        self.contexts, self.encoding = meta["contexts"], meta["encoding"]
        self.train_seconds = meta.get("train_seconds")
