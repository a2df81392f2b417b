"""Lingshu-Cell as a benchmark model: pre-train, fine-tune, then sample held-out conditions.

The data layer of the model: it turns raw counts into count tokens (SPEC 1.1), conditions into
indices, and sampled tokens back into log1p(CP10k) cells. The network
(:mod:`lingshu.models.mddm.network`), the diffusion process (:mod:`.mddm.diffusion`) and the
training loop (:mod:`lingshu.models.training`) never see AnnData.

Regime (SPEC 1.3): :meth:`LingshuCell.pretrain` trains an unconditional model on every cell
that is not held-out truth (training cells and the control input cells); :meth:`fit` starts a
conditional model from those weights and trains it on the training cells with two condition
tokens (context, perturbation). Perturbations never seen in training reach the model through
their target genes' learned gene-identity embeddings (SPEC 1.2a); to teach that path, the
identity of a training perturbation that has targets in the panel is hidden with probability
``identity_dropout``. Sampling (SPEC 1.4): N unmasking steps with classifier-free guidance
against the control condition of the same context. The sampling settings (``guidance``,
``sample_steps``, ``sample_batch``, ``unconditional_steps``, ``prior_injection``,
``stratified``; see
:mod:`lingshu.models.mddm.spec`) are read only when sampling, so a fitted model is sampled
with any of them without training again.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from lingshu.constants import CONTEXT_COL, CONTROL, PERT_COL
from lingshu.data.normalize import log1p_cp10k
from lingshu.data.tokenstore import TokenStore
from lingshu.errors import input_error
from lingshu.io import sha256_file
from lingshu.models.base import (
    ConditionInput,
    ConditionNotEncodable,
    PerturbationModel,
    TrainingData,
    data_fingerprint,
    is_main_process,
)
from lingshu.models.mddm.calibrate import recalibrate_head_bias
from lingshu.models.mddm.diagnostics import (
    HeldOutDiagnostics,
    diagnostics_table,
    marginal_log_probs,
)
from lingshu.models.mddm.diffusion import mask_tokens, masked_loss, sample, sampling_bar
from lingshu.models.mddm.network import (
    PRESETS,
    LingshuNetwork,
    NetworkConfig,
    config_from_preset,
)
from lingshu.models.mddm.spec import SPECS
from lingshu.models.training import (
    TrainConfig,
    ema_weights,
    load_checkpoint,
    save_checkpoint,
    train,
)
from lingshu.tokens import N_EXPR_TOKENS, dequantize_tokens, quantize_counts

log = logging.getLogger(__name__)

UNKNOWN = 0  # perturbation-identity index of a perturbation never seen in training

DEFAULTS: dict[str, Any] = {
    "preset": "small",
    "network": {},  # overrides of the preset's NetworkConfig fields
    "pretrain_steps": 150,
    "finetune_steps": 400,
    "batch_size": 64,  # cells per optimiser step, summed over GPUs (the paper: 256)
    "micro_batch_size": None,  # cells per forward pass and GPU (gradient accumulation)
    "lr": 1e-3,
    "min_lr": 1e-4,
    "warmup_steps": 50,
    "ema_decay": 0.99,
    "checkpoint_every": 100,
    "guidance": None,  # None: 2 for genetic, 3 for stimulation data (SPEC 1.4)
    "sample_steps": 3,
    "sample_batch": 256,
    "identity_dropout": 0.5,
    # fine-tuning: the learning rate of the condition path (condition embeddings, their
    # projections and the network's cond_head) as a multiple of ``lr``; ours (the paper has
    # one learning rate): those parameters start from scratch while the rest is pre-trained
    "cond_lr_scale": 1.0,
    # fine-tuning: the share of cells masked whole (t = 1; see mask_tokens); ours (the paper
    # draws every t from U(0, 1)): with a few genes visible a cell's type shows in them, so the
    # condition tokens are needed, and learnt, mostly where nothing is visible (measured: no
    # gain at the CPU budget; README, "Tried and rejected in the previous release")
    "full_mask_share": 0.0,
    # fine-tuning: after the last step, refit the head's per-gene bias alone for this many
    # steps, the network frozen (lingshu.models.mddm.calibrate); ours, 0 (off) by default
    "calibrate_steps": 0,
    "unconditional_steps": 256,  # SPEC 1.4: N for unconditional generation (no guidance)
    "prior_injection": False,  # SPEC 1.4: a condition's prior genes start at count 1, fixed
    # each token drawn at a uniform stratified across the batch's cells (diffusion.sample's
    # ``stratified``); ours, off by default (SPEC: independent draws)
    "stratified": False,
    "device": "auto",
    "compile": False,  # torch.compile the network for training (GPU runs)
    # the head's per-gene bias starts at each gene's log marginal token distribution in the
    # training cells ("marginal", see init_head_bias) or at zero ("zero")
    "head_bias_init": "marginal",
    # held-out bits per masked gene (lingshu.models.mddm.diagnostics) on at most this many
    # of the split's reference cells, at 4 points of each training run; 0: none
    "diagnostics_cells": 256,
}
# the parameters of the condition path (name prefixes), which ``cond_lr_scale`` speeds up
COND_PARAMETERS = ("context_emb", "pert_emb", "pert_feature_proj", "target_proj", "cond_head_")
MONITOR_POINTS = 4  # diagnostics at 1/4, 1/2, 3/4 and all of a run's steps

SAMPLING_KEYS = SPECS[0].sampling_keys
PRETRAIN_FORMAT = "lingshu-cell-pretrain/1"
PRIOR_TOKEN = 1  # the token of count 1 (quantize_counts is exact below 100)


def pretrained_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a pre-training checkpoint (also one saved as a bare state dict)."""
    ckpt = load_checkpoint(path)
    return ckpt["weights"] if ckpt.get("format") == PRETRAIN_FORMAT else ckpt


def pretrained_network(path: str | Path) -> dict | None:
    """The network config a pre-training checkpoint carries (None for a bare state dict)."""
    ckpt = load_checkpoint(path)
    return dict(ckpt["network"]) if ckpt.get("format") == PRETRAIN_FORMAT else None


# ------------------------------------------------------------------ library size (option)
# ``network: {library_size: true}`` (ours, not the paper's; see NetworkConfig): each cell's
# log1p(total count) is an input of the network. Training reads it off the cell's own tokens;
# the sampler draws it: prediction from the context's control input cells (every model gets
# them), unconditional generation from the training cells (quantiles in the checkpoint).
LIBRARY_QUANTILES = 201
_TOKEN_COUNTS = torch.from_numpy(
    np.asarray(dequantize_tokens(np.arange(N_EXPR_TOKENS)), dtype=np.float32))


def log_library(tokens: torch.Tensor) -> torch.Tensor:
    """(B,) float32 log1p(total count) of cells given as unmasked tokens (B, G): the counts
    their tokens stand for (bin centres, as sampled cells are dequantised), summed."""
    return torch.log1p(_TOKEN_COUNTS.to(tokens.device)[tokens].sum(1))


def log_library_of_counts(counts) -> np.ndarray:
    """(n,) float64 log1p(total count) of raw count rows, measured as :func:`log_library`
    measures tokens (each count through the quantiser and back)."""
    csr = sp.csr_matrix(counts)
    csr = sp.csr_matrix((np.asarray(dequantize_tokens(quantize_counts(csr.data)), np.float64),
                         csr.indices, csr.indptr), shape=csr.shape)
    return np.log1p(np.asarray(csr.sum(1)).ravel())


def library_stats(tokens: TokenStore, seed: int) -> dict[str, Any]:
    """Centre, scale and quantiles of log1p(total count) over (a seeded sample of) the
    training cells: the network's standardisation and generation's library distribution."""
    values = np.concatenate([log_library(torch.from_numpy(t)).numpy()
                             for t, _ in training_blocks(tokens, None, seed)()])
    return {"library_center": float(values.mean()),
            "library_scale": float(max(values.std(), 1e-3)),
            "quantiles": np.quantile(values, np.linspace(0, 1, LIBRARY_QUANTILES)).tolist()}


def draw_library(values: np.ndarray, n: int, rng: np.random.Generator,
                 quantiles: bool = False) -> np.ndarray:
    """``n`` library sizes (log1p) drawn with ``rng``: uniformly from ``values``, or, with
    ``quantiles``, by inverse transform from ``values`` read as evenly spaced quantiles."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("lingshu: no library sizes to draw from")
    if quantiles:
        return np.interp(rng.random(n), np.linspace(0, 1, values.size), values)
    return values[rng.integers(0, values.size, n)]


def pretrained_diagnostics(path: str | Path) -> list[dict]:
    """The held-out diagnostics a pre-training checkpoint carries (none in a bare state dict)."""
    ckpt = load_checkpoint(path)
    return list(ckpt.get("diagnostics", [])) if ckpt.get("format") == PRETRAIN_FORMAT else []


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def training_tokens(data: TrainingData) -> TokenStore:
    """The training cells' count tokens: the on-disk store of the tokenize stage when
    the pipeline gave one, else made from the counts, loaded whole (small data, tests)."""
    if data.tokens is not None:
        if data.tokens.shape != (len(data.obs), len(data.genes)):
            raise ValueError(f"lingshu: the token store holds {data.tokens.shape} cells x genes "
                             f"for {len(data.obs)} training cells x {len(data.genes)} genes")
        return data.tokens
    return TokenStore.from_counts(data.count_rows().read_all())


def token_batch(store: TokenStore, idx: torch.Tensor) -> torch.Tensor:
    """(len(idx), n_genes) long tokens of the cells ``idx`` of ``store``."""
    return torch.from_numpy(store.dense(idx.numpy()))


FLOOR_CELLS = 20_000  # training cells (a seeded sample) the diagnostics' floors count on
FLOOR_BLOCK = 1024


def training_blocks(tokens: TokenStore, contexts: np.ndarray | None, seed: int):
    """A callable giving a fresh iterable of ``(tokens, contexts)`` blocks of a seeded sample
    of at most ``FLOOR_CELLS`` training cells (``contexts`` None: blocks of ``(tokens, None)``)."""
    rng = np.random.default_rng(seed)
    sample_rows = np.sort(rng.permutation(tokens.n_cells)[:FLOOR_CELLS])

    def blocks():
        for start in range(0, sample_rows.size, FLOOR_BLOCK):
            idx = sample_rows[start:start + FLOOR_BLOCK]
            yield tokens.dense(idx), (None if contexts is None else contexts[idx])

    return blocks


def init_head_bias(net: LingshuNetwork, tokens: TokenStore, seed: int) -> None:
    """Set the head's per-gene bias to each gene's smoothed log marginal token distribution
    in (a seeded sample of) the training cells (``head_bias_init: marginal``).

    The bias carries each gene's marginal (see :mod:`lingshu.models.mddm.network`); from zeros,
    Adam moves it by about the learning rate per step, so a short run spends most of its steps
    learning marginals (on ``sim_stimulation`` the held-out loss is still above the marginal
    floor after 225 of 300 steps). Starting from the marginals, the network begins at the floor
    and its steps go to what the floor lacks: dependencies between genes. The paper does not
    say how the head is initialised; this is our choice, as the log class prior is for a
    classifier's output bias. The smoothing is tiny (1 / n pseudo-cells for n counted cells):
    with the diagnostics' one pseudo-cell, the tokens a gene never showed would start with a
    share of 1 / n together, and 1,000 genes sampled from it would draw an absurd count (a
    never-seen token, up to tens of thousands) in one of every few cells.
    """
    log_probs = marginal_log_probs(training_blocks(tokens, None, seed)(), pseudo=None)[None]
    with torch.no_grad():
        net.head_bias.copy_(torch.from_numpy(log_probs).to(net.head_bias))


def held_out_diagnostics(data: TrainingData, tokens: TokenStore, n_cells: int,
                         seed: int) -> HeldOutDiagnostics | None:
    """The diagnostics of a run on at most ``n_cells`` of ``data.validation``'s cells (the
    split's reference cells), floors counted on a sample of the training cells; None when
    there are no held-out cells or ``n_cells`` is 0."""
    held = data.validation
    if held is None or n_cells <= 0 or len(held.obs) == 0:
        return None
    held_tokens = training_tokens(held)
    rows = np.arange(min(int(n_cells), held_tokens.n_cells))
    train_blocks = training_blocks(tokens, data.obs[CONTEXT_COL].to_numpy(), seed)
    return HeldOutDiagnostics(held_tokens.dense(rows), held.obs[CONTEXT_COL].to_numpy()[rows],
                              train_blocks, seed=seed)


def monitor_steps(steps: int) -> tuple[int, ...]:
    """The steps at which a run of ``steps`` steps is diagnosed."""
    return tuple(sorted({max(1, round(steps * k / MONITOR_POINTS))
                         for k in range(1, MONITOR_POINTS + 1)})) if steps > 0 else ()


def write_diagnostics(rows: list[dict], diag: HeldOutDiagnostics | None, path: Path) -> list[dict]:
    """The diagnostics of a run as a long table (also written as TSV to ``path``)."""
    import pandas as pd

    from lingshu.io import write_table

    if diag is None:
        return []
    table = diagnostics_table(rows, diag.floors)
    write_table(pd.DataFrame(table), path)
    return table


# the options that are numbers: whole numbers, and real numbers (a default of None: optional;
# cond_lr_scale has a check of its own, with the condition path's)
_WHOLE = {k for k, v in DEFAULTS.items() if type(v) is int} | {"micro_batch_size"}
_REAL = ({k for k, v in DEFAULTS.items() if type(v) is float} | {"guidance"}) - {"cond_lr_scale"}


def _numbers(params: dict[str, Any]) -> dict[str, Any]:
    """The numeric options of ``params`` as numbers. YAML reads ``1e-5`` (no dot) as the text
    "1e-5": such text is taken as the number it spells; anything else that is not a number
    (of the right kind) is an InputError naming the field, before any work."""
    out = {}
    for key in sorted(set(params) & (_WHOLE | _REAL)):
        value = params[key]
        if value is None and DEFAULTS[key] is None:
            continue
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        whole = key in _WHOLE
        ok = (not isinstance(number, bool) and isinstance(number, (int, float))
              and np.isfinite(number) and (not whole or float(number).is_integer()))
        if not ok:
            raise input_error("config", f"models.lingshu.{key}",
                              f"{value!r} is not a {'whole ' if whole else ''}number",
                              f"write a {'whole ' if whole else ''}number (the default: "
                              f"{DEFAULTS[key]!r})")
        out[key] = int(number) if whole else float(number)
    return out


class LingshuCell(PerturbationModel):
    """The masked discrete diffusion model of the paper, trained inside the pipeline."""

    name = "lingshu"

    def __init__(self, **params: Any) -> None:
        unknown = set(params) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"lingshu: unknown parameters {sorted(unknown)}; "
                             f"known: {sorted(DEFAULTS)}")
        super().__init__(**params)
        self.cfg = {**DEFAULTS, **params, **_numbers(params)}
        if self.cfg["preset"] not in PRESETS:
            raise ValueError(f"lingshu: unknown preset {self.cfg['preset']!r}; "
                             f"choose one of {sorted(PRESETS)}")
        self._check_options()
        if self.cfg["head_bias_init"] not in ("marginal", "zero"):
            raise ValueError(f"lingshu: head_bias_init must be 'marginal' or 'zero', got "
                             f"{self.cfg['head_bias_init']!r}")
        self.device = _device(self.cfg["device"])

    def _check_options(self) -> None:
        """The options the generic number check does not cover (``cond_lr_scale``,
        ``full_mask_share``, ``calibrate_steps``, the network overrides' names and switches and
        ranks), checked before any work, each error naming the field and the fix."""
        scale = self.cfg["cond_lr_scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise input_error("config", "models.lingshu.cond_lr_scale",
                              f"{scale!r} is not a positive number",
                              "give a learning-rate multiplier > 0 (1: the paper's single "
                              "learning rate; the default config: 10)")
        share = self.cfg["full_mask_share"]
        if not 0.0 <= share < 1.0:
            raise input_error("config", "models.lingshu.full_mask_share",
                              f"{share!r} is not in [0, 1)",
                              "give the share of fine-tuning cells masked whole, e.g. 0.25 "
                              "(0: the paper's mask rates)")
        if self.cfg["calibrate_steps"] < 0:
            raise input_error("config", "models.lingshu.calibrate_steps",
                              f"{self.cfg['calibrate_steps']!r} is negative",
                              "give 0 (off, the paper's training) or a number of steps, e.g. "
                              "300 (README, \"A recalibrated head bias\")")
        network = self.cfg["network"] or {}
        known = {f.name for f in fields(NetworkConfig)} - {"n_genes", "n_contexts",
                                                            "n_perturbations", "seed"}
        unknown = sorted(set(network) - known)
        if unknown:
            raise input_error("config", "models.lingshu.network",
                              f"{unknown} are not network options",
                              f"use only {sorted(known)}")
        for key, meaning in (("library_size", "each cell's library size is an input"),
                             ("cond_head_masked", "the cond_head shift scales with the share "
                              "of masked genes")):
            if not isinstance(network.get(key, False), bool):
                raise input_error("config", f"models.lingshu.network.{key}",
                                  f"{network[key]!r} is not true or false",
                                  f"set true ({meaning}) or false")
        for key, example in (("gene_head_rank", "8"), ("cond_head_rank", "16 (the default config)")):
            rank = network.get(key, 0)
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
                raise input_error("config", f"models.lingshu.network.{key}",
                                  f"{rank!r} is not a whole number >= 0",
                                  f"set 0 (off, the paper's head) or a rank such as {example}")
        self._check_sampling_switches()

    def _check_sampling_switches(self) -> None:
        """The sampling settings that are switches must be true or false (YAML's ``no`` is;
        the text "false" would switch them on)."""
        for key, meaning in (("stratified", "each token drawn at a stratified uniform"),
                             ("prior_injection", "held-out targets' prior genes fixed")):
            if not isinstance(self.cfg[key], bool):
                raise input_error("config", f"models.lingshu.{key}",
                                  f"{self.cfg[key]!r} is not true or false",
                                  f"set true ({meaning}) or false")

    def set_sampling(self, params: dict[str, Any]) -> None:
        super().set_sampling(params)
        self._check_sampling_switches()

    def training_settings(self) -> dict[str, Any]:
        """The settings that shape training (what resumable state is tied to): all but the
        sampling settings."""
        return {k: v for k, v in self.cfg.items() if k not in SAMPLING_KEYS}

    def pretraining_settings(self) -> dict[str, Any]:
        """The settings that shape pre-training (the fit-only ones left out)."""
        return {k: v for k, v in self.training_settings().items()
                if k not in SPECS[0].fit_keys}

    def guidance(self) -> float:
        """The guidance weight w: the configured one, else SPEC 1.4's 2 for genetic and 3 for
        stimulation data."""
        if self.cfg["guidance"] is not None:
            return float(self.cfg["guidance"])
        return 2.0 if self.perturbation_type == "genetic" else 3.0

    # ------------------------------------------------------------------ configuration
    def _init_bias(self, net: LingshuNetwork, tokens: TokenStore, seed: int) -> None:
        if self.cfg["head_bias_init"] == "marginal":
            init_head_bias(net, tokens, seed)

    @property
    def library_size(self) -> bool:
        """Whether the network takes each cell's library size (``network.library_size``)."""
        return bool((self.cfg["network"] or {}).get("library_size", False))

    def _network_config(self, n_genes: int, seed: int, **conditions: Any) -> NetworkConfig:
        # The same seed in pre-training and fine-tuning gives the same gene permutation.
        return config_from_preset(self.cfg["preset"], n_genes, seed=seed,
                                  **{**self.cfg["network"], **conditions})

    def _train_config(self, steps: int, seed: int, lr_scale: dict | None = None) -> TrainConfig:
        keys = {k: self.cfg[k] for k in ("batch_size", "micro_batch_size", "lr", "min_lr",
                                         "warmup_steps", "ema_decay", "checkpoint_every",
                                         "compile")}
        # Under DDP: some parameters get no gradient on some data (the padding embedding when
        # the genes fill the groups exactly, the target-gene projection without targets).
        return TrainConfig(steps=int(steps), seed=seed, ddp_find_unused_parameters=True,
                           lr_scale=lr_scale, **keys)

    # ------------------------------------------------------------------ pre-training
    def pretrain(self, data: TrainingData, out_path: str | Path) -> None:
        """Train the unconditional model on ``data`` and write its EMA weights to ``out_path``."""
        torch.manual_seed(data.seed)
        tokens = training_tokens(data)
        lib = library_stats(tokens, data.seed) if self.library_size else None
        net_cfg = self._network_config(
            tokens.n_genes, data.seed,
            **({k: lib[k] for k in ("library_center", "library_scale")} if lib else {}))
        net = LingshuNetwork(net_cfg)
        self._init_bias(net, tokens, data.seed)
        net = net.to(self.device)

        def sample_batch(n, gen):  # the loop's generator lives on the training device
            return token_batch(tokens, torch.randint(tokens.n_cells, (n,), generator=gen,
                                                     device=gen.device).cpu())

        def loss_fn(model, batch, gen):
            noisy, mask, t = mask_tokens(batch, gen)
            d = self.device
            extra = {"library": log_library(batch).to(d)} if lib else {}
            return masked_loss(model, noisy.to(d), batch.to(d), mask.to(d), t.to(d), **extra)

        workdir = Path(data.workdir or Path(out_path).parent)
        diag = held_out_diagnostics(data, tokens, int(self.cfg["diagnostics_cells"]), data.seed)
        h_lib = log_library(diag.tokens) if diag is not None and lib else None

        def monitor(model, _step):
            d = self.device
            return diag(lambda x, rows: model(
                x.to(d), **({} if h_lib is None else {"library": h_lib[rows].to(d)})))

        steps = int(self.cfg["pretrain_steps"])
        result = train(net, loss_fn, sample_batch, self._train_config(steps, data.seed),
                       workdir / "pretrain_state.pt", device=self.device,
                       loss_curve_path=workdir / "pretrain_loss.png",
                       fingerprint=data_fingerprint(data, stage="pretrain",
                                                    params=self.pretraining_settings()),
                       monitor=monitor if diag is not None else None,
                       monitor_steps=monitor_steps(steps))
        diagnostics = write_diagnostics(result.monitor, diag,
                                        workdir / "pretrain_diagnostics.tsv")
        log.info("pre-trained %d steps at %.1f cells/s", len(result.losses),
                 result.cells_per_second)
        if not is_main_process():  # under torchrun every rank trained; rank 0 writes
            return
        # Self-describing, so that the unconditional model can be sampled on its own.
        save_checkpoint(out_path, {
            "format": PRETRAIN_FORMAT, "network": asdict(net_cfg),
            "genes": [str(g) for g in data.genes], "diagnostics": diagnostics,
            **({"library_quantiles": lib["quantiles"]} if lib else {}),
            "weights": ema_weights(load_checkpoint(workdir / "pretrain_state.pt"))})

    # ------------------------------------------------------------------ fine-tuning
    def fit(self, data: TrainingData, init: str | Path | None = None) -> None:
        torch.manual_seed(data.seed)
        genes = [str(g) for g in data.genes]
        gene_index = {g: i for i, g in enumerate(genes)}
        self.genes = genes
        self.contexts = sorted(set(data.obs[CONTEXT_COL]))
        seen = sorted(set(data.obs[PERT_COL]))
        if CONTROL not in seen:
            raise ValueError("lingshu: the training cells hold no control cells; guidance "
                             "needs the control condition")
        self.perturbations = seen  # identity index = position + 1 (0 is UNKNOWN)
        self.targets = {p: [gene_index[g] for g in t] for p, t in data.targets.items()}
        self.max_targets = max([len(t) for t in self.targets.values()] + [1])
        self.perturbation_type = data.perturbation_type

        tokens = training_tokens(data)
        ctx = torch.tensor([self.contexts.index(c) for c in data.obs[CONTEXT_COL]])
        pert = torch.tensor([self._pert_index(p) for p in data.obs[PERT_COL]])
        tgt = torch.stack([self._target_row(p) for p in self.perturbations])[pert - 1]
        has_targets = (tgt >= 0).any(dim=1)

        lib = {}
        if self.library_size:  # the pre-training's standardisation, which its weights learnt
            pre = pretrained_network(init) if init is not None else None
            lib = ({k: pre[k] for k in ("library_center", "library_scale")}
                   if pre and pre.get("library_size") else
                   {k: v for k, v in library_stats(tokens, data.seed).items()
                    if k != "quantiles"})
        self.net_cfg = self._network_config(
            tokens.n_genes, data.seed, n_contexts=len(self.contexts),
            n_perturbations=len(self.perturbations) + 1, **lib)
        net = LingshuNetwork(self.net_cfg)
        init_state = pretrained_weights(init) if init is not None else None
        if init_state is None:  # else the pre-trained weights replace every parameter
            self._init_bias(net, tokens, data.seed)
        net = net.to(self.device)

        dropout = float(self.cfg["identity_dropout"])
        full_mask = float(self.cfg["full_mask_share"])

        def sample_batch(n, gen):
            idx = torch.randint(tokens.n_cells, (n,), generator=gen, device=gen.device).cpu()
            return token_batch(tokens, idx), ctx[idx], pert[idx], tgt[idx], has_targets[idx]

        def loss_fn(model, batch, gen):
            tok, c, p, t_genes, has_t = batch
            # Hide the identity of perturbations with panel targets, so that the target-gene
            # path learns to carry the effect of perturbations never seen in training.
            hide = (torch.rand(p.shape, generator=gen, device=gen.device) < dropout) & has_t
            p = torch.where(hide, torch.full_like(p, UNKNOWN), p)
            noisy, mask, t = mask_tokens(tok, gen, full_mask=full_mask)
            d = self.device
            extra = {"library": log_library(tok).to(d)} if lib else {}
            return masked_loss(model, noisy.to(d), tok.to(d), mask.to(d), t.to(d),
                               context=c.to(d), perturbation=p.to(d),
                               target_genes=t_genes.to(d), **extra)

        workdir = Path(data.workdir or ".")
        diag = held_out_diagnostics(data, tokens, int(self.cfg["diagnostics_cells"]), data.seed)
        if diag is not None:
            held = data.validation.obs.iloc[:diag.tokens.shape[0]]
            h_ctx = torch.tensor([self.contexts.index(c) for c in held[CONTEXT_COL]])
            h_pert = torch.tensor([self._pert_index(p) for p in held[PERT_COL]])
            h_tgt = torch.stack([self._target_row(p) for p in held[PERT_COL]])
            h_lib = {"library": log_library(diag.tokens)} if lib else {}

        def monitor(model, _step):
            d = self.device
            return diag(lambda x, rows: model(
                x.to(d), context=h_ctx[rows].to(d), perturbation=h_pert[rows].to(d),
                target_genes=h_tgt[rows].to(d), **{k: v[rows].to(d) for k, v in h_lib.items()}))

        steps = int(self.cfg["finetune_steps"])
        scale = float(self.cfg["cond_lr_scale"])
        lr_scale = {prefix: scale for prefix in COND_PARAMETERS} if scale != 1.0 else None
        result = train(net, loss_fn, sample_batch,
                       self._train_config(steps, data.seed + 1, lr_scale),
                       workdir / "finetune_state.pt", device=self.device,
                       init_state_dict=init_state,
                       loss_curve_path=workdir / "finetune_loss.png",
                       fingerprint=data_fingerprint(
                           data, stage="finetune", params=self.training_settings(),
                           init=sha256_file(init) if init is not None else None),
                       monitor=monitor if diag is not None else None,
                       monitor_steps=monitor_steps(steps))
        self.diagnostics = {
            "finetune": write_diagnostics(result.monitor, diag,
                                          workdir / "finetune_diagnostics.tsv"),
            "pretrain": pretrained_diagnostics(init) if init is not None else [],
        }
        log.info("fine-tuned %d steps at %.1f cells/s", len(result.losses),
                 result.cells_per_second)
        net.load_state_dict(ema_weights(load_checkpoint(workdir / "finetune_state.pt")))
        cal_steps = int(self.cfg["calibrate_steps"])
        if cal_steps:
            before = monitor(net, steps) if diag is not None else None
            recalibrate_head_bias(
                net, loss_fn, sample_batch, cal_steps,
                int(self.cfg["micro_batch_size"] or self.cfg["batch_size"]), data.seed + 2,
                progress=is_main_process())
            if before is not None:
                after = monitor(net, steps)
                log.info("held-out bits before -> after the recalibration: %s", ", ".join(
                    f"t={k.split('@')[1]} {before[k]:.4f} -> {after[k]:.4f}" for k in before))
        self.net = net.eval()

    def _pert_index(self, label: str) -> int:
        return self.perturbations.index(label) + 1 if label in self.perturbations else UNKNOWN

    def _target_row(self, label: str) -> torch.Tensor:
        row = torch.full((self.max_targets,), -1, dtype=torch.long)
        genes = self.targets.get(label, [])[: self.max_targets]
        row[: len(genes)] = torch.tensor(genes, dtype=torch.long)
        return row

    # ------------------------------------------------------------------ sampling
    def condition_tensors(self, context: str, label: str) -> dict[str, torch.Tensor]:
        """The network's condition inputs (batch of one) for a context x perturbation."""
        if context not in self.contexts:
            raise ValueError(f"lingshu: context {context!r} was not seen in training "
                             f"(seen: {self.contexts}); it has no condition token")
        d = self.device
        return {"context": torch.tensor([self.contexts.index(context)], device=d),
                "perturbation": torch.tensor([self._pert_index(label)], device=d),
                "target_genes": self._target_row(label)[None].to(d)}

    def _prior_injection(self, condition: ConditionInput) -> dict[str, torch.Tensor]:
        """The sampler's fixed tokens for the condition's prior genes (SPEC 1.4): count 1 from
        the start, never resampled. Empty without ``prior_injection`` or prior genes."""
        if not self.cfg["prior_injection"] or not condition.prior_genes:
            return {}
        index = {g: i for i, g in enumerate(self.genes)}
        genes = [index[g] for g in condition.prior_genes if g in index]
        mask = torch.zeros(len(self.genes), dtype=torch.bool, device=self.device)
        mask[genes] = True
        return {"fixed_mask": mask, "fixed_tokens": torch.full(
            (len(self.genes),), PRIOR_TOKEN, dtype=torch.long, device=self.device)}

    _sample_bar: Any = None  # predict_many's bar over every unmasking step, while it runs

    def predict_many(self, conditions, rng, progress=False):
        """The base class's, with one bar over the unmasking steps of every sampling batch of
        every condition (steps x batches, with its ETA) rather than over conditions."""
        batch, steps = int(self.cfg["sample_batch"]), int(self.cfg["sample_steps"])
        n_batches = sum(-(-c.n_cells // batch) for c in conditions)
        with sampling_bar(steps, n_batches, "predict lingshu", disable=not progress) as bar:
            self._sample_bar = bar if progress else None
            try:
                yield from super().predict_many(conditions, rng, progress=False)
            finally:
                self._sample_bar = None

    def predict(self, condition: ConditionInput, rng: np.random.Generator) -> np.ndarray:
        cond = self.condition_tensors(condition.context, condition.perturbation)
        uncond = self.condition_tensors(condition.context, CONTROL)  # guidance against control
        gen = torch.Generator(device=self.device).manual_seed(int(rng.integers(2**62)))
        library = None
        if self.net_cfg.library_size:  # drawn from the context's control cells
            if condition.control_counts.shape[0] == 0:
                raise ConditionNotEncodable(
                    condition.context, condition.perturbation,
                    "no control cells of the context to draw library sizes from", self.name)
            library = draw_library(log_library_of_counts(condition.control_counts),
                                   condition.n_cells, rng)
        counts = self.sample_counts(cond, uncond, condition.n_cells, gen, self.guidance(),
                                    progress=self._sample_bar, library=library,
                                    **self._prior_injection(condition))
        return np.asarray(log1p_cp10k(counts), dtype=np.float32)

    def sample_counts(self, cond: dict, uncond: dict, n_cells: int, gen: torch.Generator,
                      guidance: float, progress=None, library: np.ndarray | None = None,
                      **fixed) -> np.ndarray:
        """(n_cells, n_genes) float32 raw counts of the fine-tuned network's cells under the
        condition tensors ``cond`` (see :meth:`condition_tensors`), guided against ``uncond``
        with weight ``guidance``: ``sample_steps`` unmasking steps, in batches of
        ``sample_batch`` cells, tokens mapped back to counts (bin centres). ``library``:
        (n_cells,) log1p library sizes, for a network with ``library_size`` (required there).
        ``fixed``: the sampler's fixed tokens (:meth:`_prior_injection`)."""
        if self.net_cfg.library_size != (library is not None):
            raise ValueError("lingshu: sample_counts needs `library` exactly when the network "
                             "has library_size")
        def model_fn(tokens, cnd, select=None):
            b = tokens.shape[0]
            return self.net(tokens, select=select,
                            **{k: v.expand(b, *v.shape[1:]) for k, v in cnd.items()})

        blocks = []
        for start in range(0, n_cells, int(self.cfg["sample_batch"])):
            n = min(int(self.cfg["sample_batch"]), n_cells - start)
            size = {} if library is None else {"library": torch.as_tensor(
                library[start:start + n], dtype=torch.float32, device=self.device)}
            tok = sample(model_fn, n, len(self.genes), int(self.cfg["sample_steps"]), gen,
                         cond={**cond, **size}, uncond={**uncond, **size}, guidance=guidance,
                         select=True, progress=progress, stratified=self.cfg["stratified"],
                         **fixed)
            blocks.append(np.asarray(dequantize_tokens(tok.cpu().numpy()), dtype=np.float32))
        return np.vstack(blocks)

    # ------------------------------------------------------------------ unconditional generation
    def load_pretrained(self, path: str | Path) -> None:
        """Load the unconditional pre-trained model written by :meth:`pretrain`."""
        ckpt = load_checkpoint(path)
        if ckpt.get("format") != PRETRAIN_FORMAT:
            raise ValueError(f"{path}: not a Lingshu-Cell pre-training checkpoint (format "
                             f"{ckpt.get('format')!r}, expected {PRETRAIN_FORMAT!r}); re-run "
                             "the pretrain rule")
        self.genes = list(ckpt["genes"])
        self.pretrained = LingshuNetwork(NetworkConfig(**ckpt["network"]))
        self.pretrained_library = ckpt.get("library_quantiles")
        self.pretrained.load_state_dict(ckpt["weights"])
        self.pretrained = self.pretrained.to(self.device).eval()

    def generate(self, n_cells: int, rng: np.random.Generator,
                 progress: bool = False) -> np.ndarray:
        """(n_cells, n_genes) raw counts sampled from the unconditional pre-trained model:
        ``unconditional_steps`` unmasking steps, no guidance (SPEC 1.4)."""
        if getattr(self, "pretrained", None) is None:
            raise RuntimeError("lingshu: call load_pretrained() before generate()")
        gen = torch.Generator(device=self.device).manual_seed(int(rng.integers(2**62)))
        net = self.pretrained
        library = None
        if net.cfg.library_size:  # drawn from the training cells' library sizes
            library = draw_library(self.pretrained_library, n_cells, rng, quantiles=True)

        def model_fn(tokens, cond, select=None):
            return net(tokens, select=select, **(cond or {}))

        steps, batch = int(self.cfg["unconditional_steps"]), int(self.cfg["sample_batch"])
        blocks = []
        starts = range(0, n_cells, batch)
        # One bar over every unmasking step of every batch: it moves (with an ETA) where a bar
        # over batches of hundreds of cells would sit at 0 for minutes.
        with sampling_bar(steps, len(starts), "generate lingshu", disable=not progress) as bar:
            for start in starts:
                n = min(batch, n_cells - start)
                size = None if library is None else {"library": torch.as_tensor(
                    library[start:start + n], dtype=torch.float32, device=self.device)}
                with torch.no_grad():
                    tok = sample(model_fn, n, len(self.genes), steps, gen, cond=size,
                                 select=True, progress=bar if progress else False,
                                 stratified=self.cfg["stratified"])
                blocks.append(np.asarray(dequantize_tokens(tok.cpu().numpy()), dtype=np.float32))
        return np.vstack(blocks) if blocks else np.zeros((0, len(self.genes)), np.float32)

    # ------------------------------------------------------------------ state
    def get_state(self):
        arrays = {f"w::{k}": v.detach().float().cpu().numpy()
                  for k, v in self.net.state_dict().items()}
        meta = {"network": asdict(self.net_cfg), "genes": self.genes, "contexts": self.contexts,
                "perturbations": self.perturbations, "targets": self.targets,
                "max_targets": self.max_targets, "perturbation_type": self.perturbation_type,
                "diagnostics": getattr(self, "diagnostics", {})}
        return arrays, meta

    def set_state(self, arrays, meta):
        self.genes, self.contexts = meta["genes"], meta["contexts"]
        self.perturbations, self.max_targets = meta["perturbations"], meta["max_targets"]
        self.targets = meta["targets"]
        if "perturbation_type" not in meta:
            raise ValueError("lingshu: this model file was written by an older version of the "
                             "benchmark (it stores a guidance weight instead of the data's "
                             "perturbation type); delete it and re-run its fit rule")
        self.perturbation_type = meta["perturbation_type"]
        self.diagnostics = meta.get("diagnostics", {})
        self.net_cfg = NetworkConfig(**meta["network"])
        net = LingshuNetwork(self.net_cfg)
        state = net.state_dict()
        for key, value in arrays.items():
            name = key[len("w::"):]
            state[name] = torch.from_numpy(value).to(state[name].dtype)
        net.load_state_dict(state)
        self.net = net.to(self.device).eval()
