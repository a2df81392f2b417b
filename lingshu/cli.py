"""Command line of the package: one subcommand per pipeline job (what the rules call).

Run ``python -m lingshu <command> --help``. Each command parses its arguments and calls one
stage function; the dataset entry travels as JSON (``--entry``, parsed once into a
:class:`~lingshu.config.DatasetEntry`), model settings as JSON objects, and a split as its
folder (``--split``), so a stage never re-reads or re-interprets the config file.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
import time
import traceback

from lingshu.errors import InputError

log = logging.getLogger("lingshu")


def _json(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"command line: a JSON argument is malformed ({err}). "
                         f"Fix: pass a JSON object, e.g. '{{\"key\": 1}}'") from err
    return value or {}


def _entry(args):
    from lingshu.config import DatasetEntry

    return DatasetEntry.from_json(args.entry)


def _pairs(items: list[str]) -> dict[str, str]:
    """``NAME=PATH`` arguments as a mapping."""
    return dict(item.split("=", 1) for item in items)


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------


def cmd_simulate(args) -> None:
    from lingshu.data.simulate import params_from_dict, simulate_dataset
    from lingshu.io import write_h5ad

    params = params_from_dict({**_json(args.params), "seed": args.seed})
    write_h5ad(simulate_dataset(params, progress=True), args.out)


def cmd_fetch(args) -> None:
    from lingshu.data.download import materialize_source

    materialize_source(_json(args.source), args.out)


def cmd_preprocess(args) -> None:
    from lingshu.data.preprocess import preprocess_file

    preprocess_file(args.raw, _entry(args), args.out, progress=True)


def cmd_split(args) -> None:
    import anndata as ad

    from lingshu.data.split import make_split, write_split

    entry = _entry(args)
    obs = ad.read_h5ad(args.processed, backed="r").obs
    split = make_split(obs, entry.split, seed=int(entry.split.get("seed", args.seed)),
                       where=f"config: datasets.{entry.name}")
    write_split(split, args.out)
    log.info("split: %s", split.conditions.groupby("role")["n_cells"].agg(["count", "sum"])
             .to_dict())


def cmd_tokenize(args) -> None:
    from lingshu.data.tokenstore import write_tokens

    meta = write_tokens(args.processed, args.out, progress=True)
    log.info("tokenised %d cells x %d genes (%d nonzero tokens)", meta["n_cells"], meta["n_genes"],
             meta["nnz"])


def cmd_prior(args) -> None:
    from lingshu.data.prior import prior_job

    prior_job(args.external, args.processed, _entry(args), args.out)


def cmd_features(args) -> None:
    from lingshu.data.features import features_job

    features_job(args.processed, args.split, _entry(args), args.n_components, args.seed,
                 args.out, args.out_used)


def cmd_truth(args) -> None:
    import anndata as ad

    from lingshu.data.split import read_split
    from lingshu.data.truth import build_truth
    from lingshu.io import write_h5ad

    write_h5ad(build_truth(ad.read_h5ad(args.processed, backed="r"), read_split(args.split)),
               args.out)


# ------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------


def cmd_pretrain(args) -> None:
    from lingshu.models.harness import pretrain_job

    pretrain_job(args.processed, args.split, args.features, _entry(args), args.model,
                 _json(args.params), args.seed, args.threads, args.workdir, args.tokens, args.out)


def cmd_fit(args) -> None:
    from lingshu.models.harness import fit_job

    fit_job(args.processed, args.split, args.features, _entry(args), args.model,
            _json(args.params), args.seed, args.threads, args.workdir, args.tokens, args.init,
            args.out)


def cmd_predict(args) -> None:
    from lingshu.models.harness import predict_job

    predict_job(args.processed, args.split, args.model_file, _entry(args), args.run,
                _json(args.sampling), args.seed, args.threads, args.prior, args.out)


def cmd_external(args) -> None:
    from lingshu.models.external import external_prediction_job

    external_prediction_job(args.source, args.values, args.truth, args.split, args.run,
                            args.note, args.out)


def cmd_export(args) -> None:
    from lingshu.data.export import export_job

    export_job(args.processed, args.split, args.features, args.dataset, args.seed, args.outdir)


def cmd_generate(args) -> None:
    from lingshu.models.harness import generate_job

    generate_job(args.processed, args.split, args.model, _json(args.params),
                 _json(args.sampling), args.checkpoint, args.run or args.model, args.seed,
                 args.threads, args.out)


# ------------------------------------------------------------------------------------------
# evaluation and report
# ------------------------------------------------------------------------------------------


def cmd_generation_eval(args) -> None:
    from lingshu.jit_cache import enable_numba_cache

    enable_numba_cache()  # numba code compiled once per machine, not once per job
    import anndata as ad

    from lingshu.data.split import read_split
    from lingshu.evaluate.generation import evaluate_generation

    evaluate_generation(ad.read_h5ad(args.processed, backed="r"), read_split(args.split),
                        _pairs(args.generated), args.outdir, seed=args.seed)


def cmd_evaluate(args) -> None:
    from lingshu.jit_cache import enable_numba_cache

    enable_numba_cache()  # numba code compiled once per machine, not once per job
    from lingshu.evaluate.perturbation import evaluate_to_dir

    evaluate_to_dir(args.truth, args.pred, args.outdir, threads=args.threads,
                    ceiling=args.ceiling, seed=args.seed)


def cmd_screening(args) -> None:
    from lingshu.evaluate.screening import screening_job

    screening_job(args.truth, _pairs(args.pred), args.table, args.effects,
                  n_boot=args.bootstrap, seed=args.seed, ceiling=not args.no_ceiling)


def cmd_screen(args) -> None:
    from lingshu.evaluate.candidates import candidate_screen_job

    candidate_screen_job(args.processed, args.split, args.features, args.model_file,
                         _entry(args), args.run, _json(args.sampling), args.seed, args.threads,
                         args.prior, args.out)


def cmd_report(args) -> None:
    from lingshu.jit_cache import enable_numba_cache

    enable_numba_cache()  # numba code compiled once per machine, not once per job
    from lingshu.report import build_report

    build_report(dataset=args.dataset, eval_dirs=_pairs(args.eval), ceiling_dir=args.ceiling_dir,
                 truth_path=args.truth, pred_paths=_pairs(args.pred), outdir=args.outdir,
                 benchmark_files=args.benchmarks, n_boot=args.bootstrap, seed=args.seed,
                 features_used=args.features_used, generation_dir=args.generation_dir,
                 screening_dir=args.screening_dir, screen_paths=_pairs(args.screen))


def cmd_index(args) -> None:
    from lingshu.report.index import build_index

    build_index(args.results, args.datasets, args.out)


# ------------------------------------------------------------------------------------------
# the parser
# ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lingshu", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, func, help_, *common):
        p = sub.add_parser(name, help=help_)
        p.set_defaults(func=func)
        for flag in common:
            COMMON[flag](p)
        return p

    COMMON = {
        "processed": lambda p: p.add_argument("--processed", required=True,
                                              help="the processed h5ad"),
        "split": lambda p: p.add_argument("--split", required=True,
                                          help="the split folder (cells.tsv, conditions.tsv)"),
        "entry": lambda p: p.add_argument("--entry", required=True,
                                          help="JSON of the dataset entry (name included)"),
        "seed": lambda p: p.add_argument("--seed", type=int, default=0),
        "threads": lambda p: p.add_argument("--threads", type=int, default=1),
    }

    p = add("simulate", cmd_simulate, "write the simulated perturbation dataset", "seed")
    p.add_argument("--params", default="{}", help="JSON of SimulationParams fields")
    p.add_argument("--out", required=True)

    p = add("fetch", cmd_fetch, "download (sha256-checked) or link a dataset's raw h5ad")
    p.add_argument("--source", required=True, help="JSON of the entry's source block")
    p.add_argument("--out", required=True)

    p = add("preprocess", cmd_preprocess, "validate, QC and canonicalise a raw h5ad", "entry")
    p.add_argument("--raw", required=True)
    p.add_argument("--out", required=True)

    p = add("split", cmd_split, "write the held-out split", "processed", "entry", "seed")
    p.add_argument("--out", required=True, help="the split folder")

    p = add("tokenize", cmd_tokenize, "write the on-disk count tokens (Lingshu-Cell)",
            "processed")
    p.add_argument("--out", required=True, help="the token folder")

    p = add("prior", cmd_prior, "prior genes of each perturbation from external data",
            "processed", "entry")
    p.add_argument("--external", required=True, help="external raw-count h5ad")
    p.add_argument("--out", required=True)

    p = add("features", cmd_features, "perturbation features shared by all models",
            "processed", "split", "entry", "seed")
    p.add_argument("--n-components", type=int, default=16)
    p.add_argument("--out", required=True, help="features.tsv")
    p.add_argument("--out-used", required=True,
                   help="features_used.tsv: which features each test condition got")

    p = add("truth", cmd_truth, "write the evaluation truth (held-out + control cells)",
            "processed", "split")
    p.add_argument("--out", required=True)

    def add_training(name, func, help_):
        p = add(name, func, help_, "processed", "split", "entry", "seed", "threads")
        p.add_argument("--model", required=True)
        p.add_argument("--params", default="{}", help="JSON of the training settings")
        p.add_argument("--features", required=True)
        p.add_argument("--workdir", help="folder for resumable training state")
        p.add_argument("--tokens", help="token folder of the tokenize command (models that "
                       "train from tokens): the counts are then never loaded")
        p.add_argument("--out", required=True)
        return p

    add_training("pretrain", cmd_pretrain, "unconditional pre-training (models that have it)")
    p = add_training("fit", cmd_fit, "fit a model on the training cells")
    p.add_argument("--init", help="pre-trained weights to start from")

    p = add("predict", cmd_predict, "predict every held-out condition", "processed", "split",
            "entry", "seed", "threads")
    p.add_argument("--model-file", required=True)
    p.add_argument("--run", help="the run's name (<model> or <model>@<variant>)")
    p.add_argument("--sampling", default="{}", help="JSON of the run's sampling settings")
    p.add_argument("--prior", help="prior gene table of the prior command (prior injection)")
    p.add_argument("--out", required=True)

    p = add("external", cmd_external, "check and convert predictions made outside this "
            "pipeline (a `kind: external` model entry)", "split")
    p.add_argument("--source", required=True, help="the user's prediction h5ad (read only)")
    p.add_argument("--values", required=True, choices=["counts", "log1p_cp10k"],
                   help="what its X holds")
    p.add_argument("--truth", required=True, help="the dataset's truth.h5ad")
    p.add_argument("--run", required=True, help="the entry's name (the report's row)")
    p.add_argument("--note", default="", help="the entry's note (printed by the report)")
    p.add_argument("--out", required=True)

    p = add("export", cmd_export, "export the frozen split for models run elsewhere",
            "processed", "split", "seed")
    p.add_argument("--features", required=True, help="features.tsv of the features command")
    p.add_argument("--dataset", required=True)
    p.add_argument("--outdir", required=True, help="the export folder")

    p = add("generate", cmd_generate, "generate cells unconditionally (generative models)",
            "processed", "split", "seed", "threads")
    p.add_argument("--model", required=True)
    p.add_argument("--run", help="the run's name (<model> or <model>@<variant>)")
    p.add_argument("--params", default="{}", help="JSON of the training settings")
    p.add_argument("--sampling", default="{}", help="JSON of the run's sampling settings")
    p.add_argument("--checkpoint", required=True,
                   help="what the model generates from: pretrain.pt or model.npz (its spec)")
    p.add_argument("--out", required=True)

    p = add("generation-eval", cmd_generation_eval,
            "score generated cells against the reference cells", "processed", "split", "seed")
    p.add_argument("--generated", nargs="*", default=[], metavar="RUN=H5AD")
    p.add_argument("--outdir", required=True)

    p = add("evaluate", cmd_evaluate, "score a prediction with cell-eval", "seed", "threads")
    p.add_argument("--truth", required=True)
    p.add_argument("--pred", help="prediction h5ad (not needed with --ceiling)")
    p.add_argument("--outdir", required=True)
    p.add_argument("--ceiling", action="store_true", help="estimate the data ceiling instead")

    p = add("screening", cmd_screening, "score each run's screen of the held-out conditions "
            "(does it find the strong hits?)", "seed")
    p.add_argument("--truth", required=True)
    p.add_argument("--pred", nargs="*", default=[], metavar="RUN=H5AD")
    p.add_argument("--table", required=True, help="screening.tsv: scores per run and effect")
    p.add_argument("--effects", required=True,
                   help="screening_effects.tsv: predicted and measured effects per condition")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--no-ceiling", action="store_true", help="do not score the data ceiling")

    p = add("screen", cmd_screen, "rank a dataset's screen candidates (no measured cells) by "
            "one run's predicted effect", "processed", "split", "entry", "seed", "threads")
    p.add_argument("--features", required=True, help="features.tsv of the features command")
    p.add_argument("--model-file", required=True)
    p.add_argument("--run", required=True, help="the run's name (<model> or <model>@<variant>)")
    p.add_argument("--sampling", default="{}", help="JSON of the run's sampling settings")
    p.add_argument("--prior", help="prior gene table of the prior command (prior injection)")
    p.add_argument("--out", required=True, help="screen/<run>.tsv")

    p = add("report", cmd_report, "tables, figures and the HTML page of one dataset", "seed")
    p.add_argument("--dataset", required=True)
    p.add_argument("--truth", required=True)
    p.add_argument("--eval", nargs="+", required=True, metavar="RUN=DIR")
    p.add_argument("--pred", nargs="+", required=True, metavar="RUN=H5AD")
    p.add_argument("--ceiling-dir")
    p.add_argument("--benchmarks", nargs="*", default=[])
    p.add_argument("--features-used", help="features_used.tsv of the features command")
    p.add_argument("--generation-dir", help="the generation/ folder (generation fidelity)")
    p.add_argument("--screening-dir", help="the eval/ folder holding screening.tsv and "
                   "screening_effects.tsv (the screening section)")
    p.add_argument("--screen", nargs="*", default=[], metavar="RUN=TSV",
                   help="each run's candidate screen (screen/<run>.tsv; the screen section)")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--outdir", required=True)

    p = add("index", cmd_index, "the front page linking every dataset's report")
    p.add_argument("--results", required=True)
    p.add_argument("--datasets", nargs="+", required=True)
    p.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lingshu.memory import keep_freed_memory
    from lingshu.usage import usage_line

    keep_freed_memory()  # before any command allocates: see lingshu.memory
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        args.func(args)
    except InputError as err:  # the user's to fix: the message says what and how, no traceback
        _final_error(str(err))
        return 2
    except Exception as err:  # noqa: BLE001 - a bug or a failure of the machine: traceback first
        traceback.print_exc()
        first = (str(err).strip().splitlines() or [""])[0]
        _final_error(f"lingshu {args.command} failed: {type(err).__name__}: {first} (the "
                     f"traceback above says where){machine_hint(err)}")
        return 1
    wall = time.perf_counter() - start
    log.info("%s done in %.1f s", args.command, wall)
    print(usage_line(args.command, wall), file=sys.stderr, flush=True)  # see lingshu.usage
    return 0


# What torch.save (its zip writer) and file writes raise on a short write, which a full disk
# causes; torch's own text does not say so.
_SHORT_WRITE = ("unexpected pos", "file write failed", "No space left on device")


def machine_hint(err: BaseException) -> str:
    """A hint for a failure of the machine that the exception's text does not name (empty if
    none): today a full disk."""
    if getattr(err, "errno", None) == errno.ENOSPC or any(s in str(err) for s in _SHORT_WRITE):
        return ("; the disk holding the outputs is probably full (a file was written short): "
                "free space there and run the same command again")
    return ""


def _final_error(message: str) -> None:
    """The job's error as the last line of its log (stderr): ``ERROR: <message>``, after any
    progress bar, so that it is what ``tail`` of the log and the workflow's summary show."""
    sys.stdout.flush()
    print(f"\nERROR: {message}", file=sys.stderr, flush=True)
