"""scLDM as a benchmark model: train the autoencoder, then a conditional latent flow model.

The data layer of the model: it turns raw counts into dense count batches, labels into
condition indices and perturbation features, and sampled latents back into log1p(CP10k)
cells. The networks (:mod:`.autoencoder`, :mod:`.latent`) never see AnnData; both stages
train with the shared loop of :mod:`lingshu.models.training` (AdamW, warm-up + cosine LR, EMA,
atomic resumable checkpoints, a progress bar).

Regime (SPEC 3, mapped onto the pipeline's two stages; the sampling settings ``guidance``, ``sample_steps``,
``sample_batch`` and ``output`` are read only when sampling, see :mod:`.spec`):

- :meth:`ScLDM.pretrain` trains the autoencoder (stage 1) on ``data`` (in the pipeline: the
  training cells and the control input cells) and writes a torch checkpoint with its EMA
  weights. A seeded ``recon_holdout`` fraction of those cells is kept out of training; the
  reconstruction Pearson on them is stored in the checkpoint.
- :meth:`ScLDM.fit` loads that autoencoder (or trains one first when ``init`` is None),
  encodes the training cells to their posterior means (N, M, L), standardises every latent
  coordinate with the training mean and standard deviation, and trains the latent DiT by
  flow matching conditioned on (context, perturbation). The condition is replaced by the null
  embedding with probability ``condition_dropout`` (classifier-free guidance). Perturbations
  reach the DiT through a learned identity plus a projection of their features (SPEC 1.2a);
  to teach the feature path, the identity of a training perturbation with non-zero features
  is hidden (set to the shared "unknown" identity) with probability ``identity_dropout``.
  A held-out perturbation has no identity and is predicted through its features; one whose
  features are ``unknown`` (zeros) gets the shared unknown-perturbation embedding.
- :meth:`ScLDM.predict` samples latents for the (context, perturbation) condition with an
  Euler ODE of ``sample_steps`` steps and guidance ``w`` against the null condition, decodes
  them to NB means (expression share x library size, library sizes drawn from the context's
  control cells) and, with ``output: counts`` (default), draws NB counts so that the predicted
  cells carry the sparsity and noise of real cells; ``output: mean`` returns log1p of the
  decoded mean in CP10k (where the library size drops out). Either way the result is
  log1p(CP10k), and all randomness comes from the ``rng`` passed in.

Preset sizes: ``tiny`` is for tests; ``small`` is tuned for the default pipeline on 2 CPU
cores (~1,000 genes, ~6,000 cells: about a minute for both stages); ``paper`` is GPU-sized.
The scLDM paper's own sizes are not in SPEC or the seed documents, so every ``paper`` value is
our choice (*unknown* in the SPEC's sense) and a config option.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from lingshu.constants import CONTEXT_COL, CONTROL, PERT_COL, TARGET_SUM
from lingshu.data.features import SOURCE_COL, feature_matrix
from lingshu.data.normalize import log1p_cp10k
from lingshu.data.rows import CountRows, column_sums, row_sums
from lingshu.io import sha256_file
from lingshu.models.base import (
    ConditionInput,
    PerturbationModel,
    TrainingData,
    data_fingerprint,
    model_workdir,
)
from lingshu.models.scldm.autoencoder import (
    AutoencoderConfig,
    ScLDMAutoencoder,
    reconstruction_pearson,
)
from lingshu.models.scldm.latent import (
    DiTConfig,
    LatentDiT,
    euler_sample,
    flow_matching_loss,
)
from lingshu.models.scldm.spec import SPECS
from lingshu.models.training import (
    TrainConfig,
    ema_weights,
    load_checkpoint,
    save_checkpoint,
    train,
)
from lingshu.stats import sample_negative_binomial

log = logging.getLogger(__name__)

UNKNOWN = 0  # perturbation-identity index of a perturbation never seen in training
AUTOENCODER_FORMAT = "lingshu-scldm-autoencoder/1"

PRESETS: dict[str, dict[str, Any]] = {
    # tests: a few seconds on one CPU core
    "tiny": {
        "d_model": 16, "n_heads": 2, "latent_tokens": 4, "latent_dim": 4,
        "encoder_layers": 1, "decoder_layers": 1, "kl_weight": 1e-3,
        "ae_steps": 40, "ae_batch_size": 32, "ae_lr": 3e-3,
        "dit_d_model": 32, "dit_layers": 2, "dit_heads": 2,
        "flow_steps": 80, "flow_batch_size": 64, "flow_lr": 3e-3,
        "warmup_steps": 5, "ema_decay": 0.9, "checkpoint_every": 1000,
        "condition_dropout": 0.1, "identity_dropout": 0.5, "guidance": 1.5,
        "sample_steps": 4, "sample_batch": 256, "output": "counts", "recon_holdout": 0.1,
    },
    # the default pipeline on 2 CPU cores (~1,000 genes x ~6,000 cells): about a minute of
    # training (autoencoder ~26 s, latent flow ~30 s with 2 threads; see
    # benchmarks/scldm_small.py). Guidance: on the simulated screen mean Pearson-delta was
    # 0.181 / 0.196 / 0.195 / 0.193 at w = 1 / 1.5 / 2 / 3 for a model trained this briefly.
    "small": {
        "d_model": 32, "n_heads": 2, "latent_tokens": 8, "latent_dim": 16,
        "encoder_layers": 2, "decoder_layers": 2, "kl_weight": 1e-3,
        "ae_steps": 500, "ae_batch_size": 64, "ae_lr": 2e-3,
        "dit_d_model": 64, "dit_layers": 3, "dit_heads": 4,
        "flow_steps": 1000, "flow_batch_size": 128, "flow_lr": 1e-3,
        "warmup_steps": 50, "ema_decay": 0.99, "checkpoint_every": 500,
        "condition_dropout": 0.1, "identity_dropout": 0.5, "guidance": 1.5,
        "sample_steps": 20, "sample_batch": 512, "output": "counts", "recon_holdout": 0.05,
    },
    # GPU size. The paper's sizes are not in SPEC or the seeds: all values are our choices.
    "paper": {
        "d_model": 256, "n_heads": 8, "latent_tokens": 32, "latent_dim": 32,
        "encoder_layers": 4, "decoder_layers": 4, "kl_weight": 1e-3,
        "ae_steps": 50_000, "ae_batch_size": 256, "ae_lr": 3e-4,
        "dit_d_model": 512, "dit_layers": 12, "dit_heads": 8,
        "flow_steps": 100_000, "flow_batch_size": 512, "flow_lr": 1e-4,
        "warmup_steps": 1000, "ema_decay": 0.999, "checkpoint_every": 2000,
        "condition_dropout": 0.1, "identity_dropout": 0.5, "guidance": 2.0,
        "sample_steps": 50, "sample_batch": 1024, "output": "counts", "recon_holdout": 0.01,
    },
}
# Every parameter a config block may set: the preset's keys, the preset itself and the device.
DEFAULTS: dict[str, Any] = {"preset": "small", "device": "auto",
                            **{k: None for k in PRESETS["small"]}}
OUTPUTS = ("counts", "mean")
MAX_RECON_CELLS = 500  # cells used for each reconstruction Pearson


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dense(block: sp.csr_matrix) -> torch.Tensor:
    """(n, G) float32 dense counts of a CSR block of cells."""
    return torch.from_numpy(np.asarray(block.toarray(), dtype=np.float32))


class ScLDM(PerturbationModel):
    """scLDM: permutation-invariant NB autoencoder + conditional latent flow matching."""

    name = "scldm"

    def __init__(self, **params: Any) -> None:
        unknown = set(params) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"scldm: unknown parameters {sorted(unknown)}; "
                             f"known: {sorted(DEFAULTS)}")
        super().__init__(**params)
        preset = params.get("preset", DEFAULTS["preset"])
        if preset not in PRESETS:
            raise ValueError(f"scldm: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        given = {k: v for k, v in params.items() if v is not None}
        self.cfg: dict[str, Any] = {**DEFAULTS, **PRESETS[preset], **given}
        if self.cfg["output"] not in OUTPUTS:
            raise ValueError(f"scldm: output must be one of {OUTPUTS}, got {self.cfg['output']!r}")
        for key in ("condition_dropout", "identity_dropout", "recon_holdout"):
            if not 0.0 <= float(self.cfg[key]) < 1.0:
                raise ValueError(f"scldm: {key} must lie in [0, 1), got {self.cfg[key]}")
        self.device = _device(self.cfg["device"])
        self.meta: dict[str, Any] = {}

    def set_sampling(self, params: dict[str, Any]) -> None:
        """Sampling settings on top of the preset's (None keeps the preset's value)."""
        given = {k: v for k, v in params.items() if v is not None}
        if "output" in given and given["output"] not in OUTPUTS:
            raise ValueError(f"scldm: output must be one of {OUTPUTS}, got {given['output']!r}")
        super().set_sampling(given)

    def training_settings(self) -> dict[str, Any]:
        """The settings that shape training (what resumable state is tied to)."""
        return {k: v for k, v in self.cfg.items() if k not in SPECS[0].sampling_keys}

    def pretraining_settings(self) -> dict[str, Any]:
        """The settings that shape pre-training (the fit-only ones left out)."""
        return {k: v for k, v in self.training_settings().items()
                if k not in SPECS[0].fit_keys}

    # ------------------------------------------------------------------ configuration
    def _autoencoder_config(self, n_genes: int) -> AutoencoderConfig:
        keys = ("d_model", "n_heads", "latent_tokens", "latent_dim", "encoder_layers",
                "decoder_layers")
        return AutoencoderConfig(n_genes=n_genes, **{k: int(self.cfg[k]) for k in keys})

    def _train_config(self, stage: str, seed: int) -> TrainConfig:
        lr = float(self.cfg[f"{stage}_lr"])
        return TrainConfig(steps=int(self.cfg[f"{stage}_steps"]),
                           batch_size=int(self.cfg[f"{stage}_batch_size"]), lr=lr,
                           min_lr=0.1 * lr, warmup_steps=int(self.cfg["warmup_steps"]),
                           ema_decay=float(self.cfg["ema_decay"]),
                           checkpoint_every=int(self.cfg["checkpoint_every"]), seed=seed)

    # ------------------------------------------------------------------ stage 1: autoencoder
    def pretrain(self, data: TrainingData, out_path: str | Path) -> None:
        """Train the autoencoder on ``data`` and write its EMA weights to ``out_path``.

        The checkpoint (``torch.load(..., weights_only=True)``) holds ``format``, ``config``
        (the AutoencoderConfig), ``genes``, ``weights`` and the reconstruction Pearson on the
        ``recon_holdout`` cells kept out of training.
        """
        torch.manual_seed(data.seed)
        counts = data.count_rows()  # read batch by batch (on disk in the pipeline's jobs)
        n_cells, n_genes = counts.shape
        order = np.random.default_rng(data.seed).permutation(n_cells)
        n_held = min(int(round(float(self.cfg["recon_holdout"]) * n_cells)), MAX_RECON_CELLS,
                     n_cells - 1)
        held, kept = np.sort(order[:n_held]), np.sort(order[n_held:])
        is_kept = np.zeros(n_cells, dtype=bool)
        is_kept[kept] = True
        ae_cfg = self._autoencoder_config(n_genes)
        ae = ScLDMAutoencoder(ae_cfg)
        gene_totals = column_sums(counts, select=is_kept)
        ae.init_gene_bias(torch.from_numpy(gene_totals / max(gene_totals.sum(), 1.0)))
        kl_weight = float(self.cfg["kl_weight"])
        latent_shape = (ae_cfg.latent_tokens, ae_cfg.latent_dim)

        def sample_batch(n: int, gen: torch.Generator) -> torch.Tensor:
            idx = torch.randint(kept.size, (n,), generator=gen, device=gen.device)
            return _dense(counts.read(kept[idx.cpu().numpy()]))  # (n, G)

        def loss_fn(model: torch.nn.Module, batch: torch.Tensor,
                    gen: torch.Generator) -> torch.Tensor:
            noise = torch.randn((batch.shape[0], *latent_shape), generator=gen,
                                device=gen.device).to(batch.device)
            nll, kl = model(batch, noise)  # (B,), (B,)
            return (nll + kl_weight * kl).mean() / n_genes  # per gene, as the LR expects

        with model_workdir(data.workdir or Path(out_path).parent, "scldm-") as workdir:
            state_path = workdir / "autoencoder_state.pt"
            result = train(ae, loss_fn, sample_batch, self._train_config("ae", data.seed),
                           state_path, device=self.device,
                           loss_curve_path=workdir / "autoencoder_loss.png",
                           fingerprint=data_fingerprint(data, stage="autoencoder",
                                                        params=self.pretraining_settings()))
            weights = ema_weights(load_checkpoint(state_path))
        ae.load_state_dict(weights)
        ae.eval()
        r = reconstruction_pearson(ae, _dense(counts.read(held))) if n_held else torch.zeros(0)
        r_held = float(np.nanmean(r.numpy())) if r.numel() else float("nan")
        log.info("autoencoder: %d steps in %.1f s; reconstruction Pearson on %d held-out "
                 "cells %.4f", len(result.losses), result.seconds, n_held, r_held)
        save_checkpoint(out_path, {
            "format": AUTOENCODER_FORMAT, "config": asdict(ae_cfg),
            "genes": [str(g) for g in data.genes], "weights": weights,
            "reconstruction_pearson_heldout": r_held, "n_heldout": int(n_held),
            "train_seconds": float(result.seconds), "final_loss": float(result.losses[-1])
            if result.losses else float("nan"),
        })

    def _load_autoencoder(self, path: str | Path, genes: list[str]) -> dict[str, Any]:
        ckpt = load_checkpoint(path)
        if ckpt.get("format") != AUTOENCODER_FORMAT:
            raise ValueError(f"scldm: {path} is not an scLDM autoencoder checkpoint "
                             f"(format {ckpt.get('format')!r}); run pretrain first")
        if list(ckpt["genes"]) != genes:
            raise ValueError(f"scldm: {path} was trained on other genes than the training "
                             "data's; re-run pretrain on this dataset")
        self.ae_cfg = AutoencoderConfig(**ckpt["config"])
        ae = ScLDMAutoencoder(self.ae_cfg)
        ae.load_state_dict(ckpt["weights"])
        self.ae = ae.to(self.device).eval()
        return ckpt

    @torch.no_grad()
    def _encode(self, counts: CountRows, chunk: int = 1024) -> torch.Tensor:
        """(N, G) raw counts -> (N, M, L) posterior-mean latents on the CPU."""
        out = [self.ae.encode(_dense(block).to(self.device)).float().cpu()
               for _, block in counts.blocks(chunk)]
        return torch.cat(out)

    def reconstruction_pearson(self, counts: sp.csr_matrix | np.ndarray) -> float:
        """Mean over cells of the Pearson of log1p(CP10k) counts with their decoded NB mean.

        counts: (n, G) raw counts. Cells without counts are left out of the mean.
        """
        x = sp.csr_matrix(counts, dtype=np.float32)
        r = reconstruction_pearson(self.ae, _dense(x)).numpy()
        return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")

    # ------------------------------------------------------------------ stage 2: latent flow
    def fit(self, data: TrainingData, init: str | Path | None = None) -> None:
        """Train the latent flow model on ``data`` from the autoencoder at ``init``.

        Without ``init`` the autoencoder is trained first on ``data`` itself.
        """
        torch.manual_seed(data.seed)
        self.genes = [str(g) for g in data.genes]
        counts = data.count_rows()
        with model_workdir(data.workdir, "scldm-") as workdir:
            if init is None:
                init = workdir / "autoencoder.pt"
                self.pretrain(data, init)
            ae_ckpt = self._load_autoencoder(init, self.genes)

            self.contexts = sorted(set(data.obs[CONTEXT_COL].astype(str)))
            self.perturbations = sorted(set(data.obs[PERT_COL].astype(str)))  # id = pos + 1
            self._set_features(data)
            latents = self._encode(counts)  # (N, M, L)
            self.latent_mean = latents.mean(0)
            self.latent_std = latents.std(0).clamp_min(1e-3)
            z = (latents - self.latent_mean) / self.latent_std
            labels = data.obs[PERT_COL].astype(str).to_numpy()
            ctx = torch.tensor([self.contexts.index(c) for c in data.obs[CONTEXT_COL].astype(str)])
            pert = torch.tensor([self._pert_index(p) for p in labels])
            feat_row = torch.tensor([self.feature_labels.index(p) for p in labels])
            hideable = self.has_features[feat_row]  # identity may be hidden: features exist

            self.dit_cfg = DiTConfig(
                latent_tokens=self.ae_cfg.latent_tokens, latent_dim=self.ae_cfg.latent_dim,
                d_model=int(self.cfg["dit_d_model"]), n_layers=int(self.cfg["dit_layers"]),
                n_heads=int(self.cfg["dit_heads"]), n_contexts=len(self.contexts),
                n_perturbations=len(self.perturbations) + 1,
                feature_dim=int(self.features.shape[1]))
            dit = LatentDiT(self.dit_cfg)
            features = self.features
            p_null = float(self.cfg["condition_dropout"])
            p_hide = float(self.cfg["identity_dropout"])

            def sample_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
                idx = torch.randint(z.shape[0], (n,), generator=gen, device=gen.device).cpu()
                return z[idx], ctx[idx], pert[idx], features[feat_row[idx]], hideable[idx]

            def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, ...],
                        gen: torch.Generator) -> torch.Tensor:
                x1, c, p, f, can_hide = batch
                draws = torch.rand((2, x1.shape[0]), generator=gen, device=gen.device)
                draws = draws.to(x1.device)
                p = torch.where((draws[0] < p_hide) & can_hide, torch.zeros_like(p), p)
                null = draws[1] < p_null
                return flow_matching_loss(model, x1, gen, context=c, perturbation=p,
                                          features=f, null=null)

            result = train(dit, loss_fn, sample_batch, self._train_config("flow", data.seed + 1),
                           workdir / "flow_state.pt", device=self.device,
                           loss_curve_path=workdir / "flow_loss.png",
                           fingerprint=data_fingerprint(data, stage="flow",
                                                        params=self.training_settings(),
                                                        init=sha256_file(init)))
            dit.load_state_dict(ema_weights(load_checkpoint(workdir / "flow_state.pt")))
        self.dit = dit.to(self.device).eval()

        rows = np.sort(np.random.default_rng(data.seed).permutation(counts.shape[0])
                       [:MAX_RECON_CELLS])
        self.meta = {
            "reconstruction_pearson_heldout": float(ae_ckpt["reconstruction_pearson_heldout"]),
            "reconstruction_n_heldout": int(ae_ckpt["n_heldout"]),
            "reconstruction_pearson_train": self.reconstruction_pearson(counts.read(rows)),
            "autoencoder_seconds": float(ae_ckpt.get("train_seconds", float("nan"))),
            "flow_seconds": float(result.seconds),
            "flow_final_loss": float(result.losses[-1]) if result.losses else float("nan"),
        }
        self._set_library_fallback(counts, data)
        log.info("scldm: latent flow %d steps in %.1f s; reconstruction Pearson: held-out "
                 "cells %.4f (%d cells never seen by the autoencoder), training cells %.4f",
                 len(result.losses), result.seconds, self.meta["reconstruction_pearson_heldout"],
                 self.meta["reconstruction_n_heldout"], self.meta["reconstruction_pearson_train"])

    def _set_features(self, data: TrainingData) -> None:
        """Feature table (labels, F) of every perturbation the model may be asked about.

        Features are divided by their root mean square over the rows that have any, so the
        projection sees values of order one whatever the feature source.
        """
        table = data.features
        labels = set(self.perturbations) | set(map(str, data.targets))
        if table is not None:
            labels |= set(map(str, table.index))
        self.feature_labels = sorted(labels)
        feats = feature_matrix(table, self.feature_labels).astype(np.float32)  # (n, F)
        if table is not None and SOURCE_COL in table:
            source = table[SOURCE_COL].astype(str).reindex(self.feature_labels)
            feats[(source.fillna("unknown") == "unknown").to_numpy()] = 0.0
        present = np.abs(feats).sum(axis=1) > 0 if feats.shape[1] else np.zeros(len(feats), bool)
        rms = float(np.sqrt(np.mean(feats[present] ** 2))) if present.any() else 1.0
        self.feature_scale = rms if rms > 0 else 1.0
        self.features = torch.from_numpy(feats / self.feature_scale)
        self.has_features = torch.from_numpy(present)

    def _set_library_fallback(self, counts: CountRows, data: TrainingData) -> None:
        """Median library size of each context's training cells, for controls-free predictions."""
        lib = row_sums(counts)
        ctx = data.obs[CONTEXT_COL].astype(str).to_numpy()
        self.library_fallback = {c: float(np.median(lib[ctx == c])) for c in self.contexts}
        # 1,001 quantiles of the training library sizes: unconditional generation draws from them.
        self.library_quantiles = np.quantile(lib, np.linspace(0, 1, 1001)).astype(np.float64)

    def _pert_index(self, label: str) -> int:
        return self.perturbations.index(label) + 1 if label in self.perturbations else UNKNOWN

    # ------------------------------------------------------------------ sampling
    def condition_tensors(self, context: str, label: str, n: int = 1,
                          null: bool = False) -> dict[str, torch.Tensor]:
        """The DiT's condition keyword arguments (batch of ``n``) for a context x perturbation."""
        if context not in self.contexts:
            raise ValueError(f"scldm: context {context!r} was not seen in training "
                             f"(seen: {self.contexts}); it has no condition embedding")
        d = self.device
        row = (self.features[self.feature_labels.index(label)] if label in self.feature_labels
               else torch.zeros(self.features.shape[1]))
        return {"context": torch.full((n,), self.contexts.index(context), device=d),
                "perturbation": torch.full((n,), self._pert_index(label), device=d),
                "features": row[None].expand(n, -1).to(d),
                "null": torch.full((n,), bool(null), device=d)}

    @torch.no_grad()
    def sample_shares(self, context: str, label: str, n: int,
                      generator: torch.Generator) -> torch.Tensor:
        """(n, G) decoded expression shares of ``n`` sampled cells of a condition.

        The starting noise is drawn on the CPU from ``generator``, so it does not depend on the
        device.
        """
        shape = (n, self.ae_cfg.latent_tokens, self.ae_cfg.latent_dim)
        noise = torch.randn(shape, generator=generator).to(self.device)
        cond = self.condition_tensors(context, label, n)
        uncond = self.condition_tensors(context, label, n, null=True)
        z = euler_sample(self.dit, noise, int(self.cfg["sample_steps"]), cond, uncond,
                         float(self.cfg["guidance"]))
        z = z * self.latent_std.to(self.device) + self.latent_mean.to(self.device)
        return self.ae.decode_probs(z).cpu()

    @torch.no_grad()
    def generate(self, n_cells: int, rng: np.random.Generator,
                 progress: bool = False) -> np.ndarray:
        """(n_cells, n_genes) NB counts of unconditionally generated cells.

        The latent flow model runs with the null condition (the unconditional branch it learnt
        through condition dropout, no guidance); library sizes are drawn from the training
        cells' library-size distribution (1,001 stored quantiles, interpolated).
        """
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        theta = self.ae.theta().detach().cpu().numpy().astype(np.float64)
        shape = (self.ae_cfg.latent_tokens, self.ae_cfg.latent_dim)
        batch, blocks = int(self.cfg["sample_batch"]), []
        starts = range(0, n_cells, batch)
        for start in tqdm(starts, desc="generate scldm", unit="batch", disable=not progress):
            n = min(batch, n_cells - start)
            noise = torch.randn((n, *shape), generator=gen).to(self.device)
            null = self.condition_tensors(self.contexts[0], CONTROL, n, null=True)
            z = euler_sample(self.dit, noise, int(self.cfg["sample_steps"]), null)
            z = z * self.latent_std.to(self.device) + self.latent_mean.to(self.device)
            shares = self.ae.decode_probs(z).cpu().double().numpy()
            lib = np.interp(rng.uniform(0, 1, n), np.linspace(0, 1, 1001),
                            self.library_quantiles)
            blocks.append(sample_negative_binomial(shares * lib[:, None], theta, rng)
                          .astype(np.float32))
        return np.vstack(blocks) if blocks else np.zeros((0, len(self.genes)), np.float32)

    def predict(self, condition: ConditionInput, rng: np.random.Generator) -> np.ndarray:
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        library = np.asarray(condition.control_counts.sum(axis=1)).ravel() \
            if condition.control_counts is not None else np.zeros(0)
        library = library[library > 0]
        if library.size == 0:
            library = np.array([self.library_fallback.get(condition.context, TARGET_SUM)])
        theta = self.ae.theta().detach().cpu().numpy().astype(np.float64)
        blocks = []
        batch = int(self.cfg["sample_batch"])
        for start in range(0, condition.n_cells, batch):
            n = min(batch, condition.n_cells - start)
            shares = self.sample_shares(condition.context, condition.perturbation, n, gen)
            shares = shares.double().numpy()
            if self.cfg["output"] == "mean":
                blocks.append(np.log1p(shares * TARGET_SUM))
                continue
            lib = rng.choice(library, size=n)
            sampled = sample_negative_binomial(shares * lib[:, None], theta, rng)
            blocks.append(log1p_cp10k(sampled))
        if not blocks:
            return np.zeros((0, len(self.genes)), dtype=np.float32)
        return np.asarray(np.vstack(blocks), dtype=np.float32)

    # ------------------------------------------------------------------ state
    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {f"ae::{k}": v.detach().float().cpu().numpy()
                  for k, v in self.ae.state_dict().items()}
        arrays.update({f"dit::{k}": v.detach().float().cpu().numpy()
                       for k, v in self.dit.state_dict().items()})
        arrays["latent_mean"] = self.latent_mean.numpy()
        arrays["latent_std"] = self.latent_std.numpy()
        arrays["features"] = self.features.numpy()
        arrays["has_features"] = self.has_features.numpy()
        arrays["library_quantiles"] = self.library_quantiles
        meta = {"autoencoder": asdict(self.ae_cfg), "dit": asdict(self.dit_cfg),
                "genes": self.genes, "contexts": self.contexts,
                "perturbations": self.perturbations, "feature_labels": self.feature_labels,
                "feature_scale": self.feature_scale, "library_fallback": self.library_fallback,
                **self.meta}
        return arrays, meta

    def set_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.genes, self.contexts = list(meta["genes"]), list(meta["contexts"])
        self.perturbations = list(meta["perturbations"])
        self.feature_labels = list(meta["feature_labels"])
        self.feature_scale = float(meta["feature_scale"])
        self.library_fallback = dict(meta["library_fallback"])
        known = {"autoencoder", "dit", "genes", "contexts", "perturbations", "feature_labels",
                 "feature_scale", "library_fallback", "model", "params"}
        self.meta = {k: v for k, v in meta.items() if k not in known}
        self.ae_cfg = AutoencoderConfig(**meta["autoencoder"])
        self.dit_cfg = DiTConfig(**meta["dit"])
        self.ae = self._load_module(ScLDMAutoencoder(self.ae_cfg), arrays, "ae::")
        self.dit = self._load_module(LatentDiT(self.dit_cfg), arrays, "dit::")
        self.latent_mean = torch.from_numpy(arrays["latent_mean"])
        self.latent_std = torch.from_numpy(arrays["latent_std"])
        self.features = torch.from_numpy(arrays["features"])
        self.has_features = torch.from_numpy(arrays["has_features"])
        # Model files written before unconditional generation existed: the context medians.
        self.library_quantiles = arrays.get(
            "library_quantiles", np.full(1001, np.median(list(self.library_fallback.values()))))

    def _load_module(self, module: torch.nn.Module, arrays: dict[str, np.ndarray],
                     prefix: str) -> torch.nn.Module:
        state = module.state_dict()
        for key, value in arrays.items():
            if key.startswith(prefix):
                name = key[len(prefix):]
                state[name] = torch.from_numpy(value).to(state[name].dtype)
        module.load_state_dict(state)
        return module.to(self.device).eval()
