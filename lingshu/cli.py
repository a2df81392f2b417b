"""Command line of the package: one subcommand per pipeline stage (what the rules call).

Run ``python -m lingshu <command> --help``. Dataset entries and model parameters travel as
JSON strings (the Snakefile passes the validated config entry), so a stage never re-reads or
re-interprets the config file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from lingshu.constants import PERT_COL
from lingshu.errors import InputError

log = logging.getLogger("lingshu")


def _json(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"command line: a JSON argument is malformed ({err}). "
                         f"Fix: pass a JSON object, e.g. '{{\"key\": 1}}'") from err
    return value or {}


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

    preprocess_file(args.raw, _json(args.entry), args.dataset, args.out, progress=True)


def cmd_split(args) -> None:
    import anndata as ad

    from lingshu.data.split import make_split, write_split

    obs = ad.read_h5ad(args.processed, backed="r").obs
    split = make_split(obs, _json(args.spec), seed=args.seed, where=args.where)
    write_split(split, args.cells, args.conditions)
    log.info("split: %s", split.conditions.groupby("role")["n_cells"].agg(["count", "sum"])
             .to_dict())


def _load(processed: str, cells: str, conditions: str):
    """The processed data, backed (a stage reads only the rows it needs), and the split."""
    import anndata as ad

    from lingshu.data.split import read_split

    return ad.read_h5ad(processed, backed="r"), read_split(cells, conditions)


def cmd_tokenize(args) -> None:
    from lingshu.data.tokenstore import write_tokens

    meta = write_tokens(args.processed, args.out, progress=True)
    log.info("tokenised %d cells x %d genes (%d nonzero tokens)", meta["n_cells"], meta["n_genes"],
             meta["nnz"])


def cmd_prior(args) -> None:
    import anndata as ad

    from lingshu.data.preprocess import _open_h5
    from lingshu.data.prior import write_prior
    from lingshu.stages import external_prior

    _open_h5(args.external).close()  # a clear error for a missing or unreadable file
    external = ad.read_h5ad(args.external, backed="r")
    processed = ad.read_h5ad(args.processed, backed="r")
    table = external_prior(external, processed, _json(args.spec), _json(args.entry),
                           path=args.external)
    write_prior(table, args.out)
    n = table.groupby("perturbation").size()
    log.info("prior: %d genes for %d perturbations (median %.0f per perturbation)",
             len(table), len(n), float(n.median()) if len(n) else 0.0)


def cmd_features(args) -> None:
    from lingshu.io import write_table
    from lingshu.stages import compute_features

    adata, split = _load(args.processed, args.cells, args.conditions)
    table = compute_features(adata, split, _json(args.entry), args.n_components, args.seed)
    write_table(table.reset_index(), args.out)


def cmd_truth(args) -> None:
    from lingshu.io import write_h5ad
    from lingshu.stages import build_truth

    adata, split = _load(args.processed, args.cells, args.conditions)
    write_h5ad(build_truth(adata, split), args.out)


def _limit_threads(threads: int) -> None:
    """Keep torch (when a model uses it) to the job's threads."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(max(1, threads))


def _training_data(args, include_control_input: bool = False):
    from lingshu.data.tokenstore import TokenStore
    from lingshu.models.registry import TOKENISED
    from lingshu.stages import read_features, training_data

    if args.tokens and args.model not in TOKENISED:
        raise InputError(f"command line: --tokens is for models that train from count tokens "
                         f"({sorted(TOKENISED)}), not {args.model}. Fix: drop --tokens")
    # With --tokens the counts are never read from the processed file.
    adata, split = _load(args.processed, args.cells, args.conditions)
    tokens = (TokenStore.open(args.tokens, obs_names=adata.obs_names, genes=adata.var_names)
              if args.tokens else None)
    return training_data(adata, split, read_features(args.features), seed=args.seed,
                         entry=_json(args.entry), workdir=args.workdir, threads=args.threads,
                         include_control_input=include_control_input, tokens=tokens)


def cmd_pretrain(args) -> None:
    from lingshu.models.registry import PRETRAINING, build_model

    if args.model not in PRETRAINING:
        raise InputError(f"command line: --model {args.model}: this model has no pre-training "
                         f"stage. Fix: use one of {sorted(PRETRAINING)}")
    model = build_model(args.model, _json(args.params))
    _limit_threads(args.threads)
    model.pretrain(_training_data(args, include_control_input=True), args.out)


def cmd_fit(args) -> None:
    from lingshu.models.base import is_main_process
    from lingshu.models.registry import build_model

    model = build_model(args.model, _json(args.params))
    _limit_threads(args.threads)
    data = _training_data(args)
    start = time.perf_counter()
    if args.init:
        model.fit(data, init=args.init)
    else:
        model.fit(data)
    log.info("fit %s in %.1f s", args.model, time.perf_counter() - start)
    if is_main_process():  # under torchrun, rank 0 writes the model
        model.save(args.out)


def cmd_predict(args) -> None:
    import anndata as ad

    from lingshu.io import write_h5ad
    from lingshu.models.registry import load_model
    from lingshu.stages import predict_conditions, read_features, write_features_used

    adata, split = _load(args.processed, args.cells, args.conditions)
    truth = ad.read_h5ad(args.truth)
    model = load_model(args.model_file)
    model.threads = max(1, int(args.threads))
    _limit_threads(args.threads)
    prior = None
    if args.prior:
        from lingshu.data.prior import read_prior
        from lingshu.stages import prior_of_labels

        prior = prior_of_labels(read_prior(args.prior), split.test_conditions()[PERT_COL].unique(),
                                _json(args.entry))
    pred = predict_conditions(model, adata, split, truth, seed=args.seed, prior=prior)
    write_h5ad(pred, args.out)
    write_features_used(read_features(args.features), split.test_conditions(),
                        args.features_used)


def cmd_generate(args) -> None:
    import anndata as ad

    from lingshu.data.split import read_split
    from lingshu.generation import generate_cells, reference_rows
    from lingshu.io import write_h5ad
    from lingshu.models.registry import load_generator

    split = read_split(args.cells, args.conditions)
    processed = ad.read_h5ad(args.processed, backed="r")  # the gene list only
    genes = processed.var_names.to_numpy()
    processed.file.close()
    model = load_generator(args.model, _json(args.params), args.checkpoint)
    model.threads = max(1, int(args.threads))
    _limit_threads(args.threads)
    n_cells = int(reference_rows(split).size)
    if n_cells == 0:
        raise InputError(f"{args.cells}: no reference cells to generate against. Fix: set "
                         "split.reference_fraction above 0 in the dataset's config entry")
    write_h5ad(generate_cells(model, genes, n_cells, seed=args.seed), args.out)


def cmd_generation_eval(args) -> None:
    from lingshu.generation import evaluate_generation

    adata, split = _load(args.processed, args.cells, args.conditions)
    generated = dict(pair.split("=", 1) for pair in args.generated)
    evaluate_generation(adata, split, generated, args.outdir, seed=args.seed)


def cmd_evaluate(args) -> None:
    from lingshu.evaluate.perturbation import evaluate_to_dir

    evaluate_to_dir(args.truth, args.pred, args.outdir, threads=args.threads,
                    ceiling=args.ceiling)


def cmd_report(args) -> None:
    from lingshu.report import build_report

    eval_dirs = dict(pair.split("=", 1) for pair in args.eval)
    preds = dict(pair.split("=", 1) for pair in args.pred)
    build_report(dataset=args.dataset, eval_dirs=eval_dirs, ceiling_dir=args.ceiling_dir,
                 truth_path=args.truth, pred_paths=preds, outdir=args.outdir,
                 benchmark_files=args.benchmarks, n_boot=args.bootstrap, seed=args.seed,
                 features_used=args.features_used, generation_dir=args.generation_dir)


def cmd_index(args) -> None:
    from lingshu.report.index import build_index

    build_index(args.results, args.datasets, args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lingshu", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, func, help_):
        p = sub.add_parser(name, help=help_)
        p.set_defaults(func=func)
        return p

    p = add("simulate", cmd_simulate, "write the simulated perturbation dataset")
    p.add_argument("--params", default="{}", help="JSON of SimulationParams fields")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)

    p = add("fetch", cmd_fetch, "download (sha256-checked) or link a dataset's raw h5ad")
    p.add_argument("--source", required=True, help="JSON of the entry's source block")
    p.add_argument("--out", required=True)

    p = add("preprocess", cmd_preprocess, "validate, QC and canonicalise a raw h5ad")
    p.add_argument("--raw", required=True)
    p.add_argument("--entry", required=True, help="JSON of the dataset entry")
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True)

    split_files = [("--cells", "split cell table"), ("--conditions", "split condition table")]

    p = add("tokenize", cmd_tokenize, "write the on-disk count tokens (Lingshu-Cell)")
    p.add_argument("--processed", required=True)
    p.add_argument("--out", required=True, help="the token folder")

    p = add("split", cmd_split, "write the held-out split")
    p.add_argument("--processed", required=True)
    p.add_argument("--spec", required=True, help="JSON of the entry's split block")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--where", default="config", help="named in error messages")
    for flag, help_ in split_files:
        p.add_argument(flag, required=True, help=help_)

    def add_data_args(p):
        p.add_argument("--processed", required=True)
        for flag, help_ in split_files:
            p.add_argument(flag, required=True, help=help_)

    p = add("features", cmd_features, "perturbation features shared by all models")
    add_data_args(p)
    p.add_argument("--entry", required=True)
    p.add_argument("--n-components", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)

    p = add("truth", cmd_truth, "write the evaluation truth (held-out + control cells)")
    add_data_args(p)
    p.add_argument("--out", required=True)

    def add_fit_args(p):
        add_data_args(p)
        p.add_argument("--model", required=True)
        p.add_argument("--params", default="{}")
        p.add_argument("--features", required=True)
        p.add_argument("--entry", default="{}", help="JSON of the dataset entry")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--workdir", help="folder for resumable training state")
        p.add_argument("--tokens", help="token folder of the tokenize command (models that "
                       "train from tokens): the counts are then never loaded")
        p.add_argument("--out", required=True)

    p = add("pretrain", cmd_pretrain, "unconditional pre-training (models that have it)")
    add_fit_args(p)

    p = add("fit", cmd_fit, "fit a model on the training cells")
    add_fit_args(p)
    p.add_argument("--init", help="pre-trained weights to start from")

    p = add("predict", cmd_predict, "predict every held-out condition")
    add_data_args(p)
    p.add_argument("--truth", required=True)
    p.add_argument("--model-file", required=True)
    p.add_argument("--features", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--features-used", required=True)
    p.add_argument("--prior", help="prior gene table of the prior command (prior injection)")
    p.add_argument("--entry", default="{}", help="JSON of the dataset entry")

    p = add("prior", cmd_prior, "prior genes of each perturbation from external data")
    p.add_argument("--external", required=True, help="external raw-count h5ad")
    p.add_argument("--processed", required=True)
    p.add_argument("--spec", required=True, help="JSON of the entry's prior block")
    p.add_argument("--entry", required=True, help="JSON of the dataset entry")
    p.add_argument("--out", required=True)

    p = add("generate", cmd_generate, "generate cells unconditionally (generative models)")
    add_data_args(p)
    p.add_argument("--model", required=True)
    p.add_argument("--params", default="{}")
    p.add_argument("--checkpoint", required=True,
                   help="pretrain.pt (Lingshu-Cell) or model.npz (scLDM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)

    p = add("generation-eval", cmd_generation_eval,
            "score generated cells against the reference cells; table and figures")
    add_data_args(p)
    p.add_argument("--generated", nargs="*", default=[], metavar="MODEL=H5AD")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--outdir", required=True)

    p = add("evaluate", cmd_evaluate, "score a prediction with cell-eval")
    p.add_argument("--truth", required=True)
    p.add_argument("--pred", help="prediction h5ad (not needed with --ceiling)")
    p.add_argument("--outdir", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ceiling", action="store_true", help="estimate the data ceiling instead")

    p = add("report", cmd_report, "tables, figures and the HTML page of one dataset")
    p.add_argument("--dataset", required=True)
    p.add_argument("--truth", required=True)
    p.add_argument("--eval", nargs="+", required=True, metavar="MODEL=DIR")
    p.add_argument("--pred", nargs="+", required=True, metavar="MODEL=H5AD")
    p.add_argument("--ceiling-dir")
    p.add_argument("--benchmarks", nargs="*", default=[])
    p.add_argument("--features-used", help="a predictions/<model>.features.tsv")
    p.add_argument("--generation-dir", help="the generation/ folder (generation fidelity)")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--outdir", required=True)

    p = add("index", cmd_index, "the front page linking every dataset's report")
    p.add_argument("--results", required=True)
    p.add_argument("--datasets", nargs="+", required=True)
    p.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        args.func(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log.info("%s done in %.1f s", args.command, time.perf_counter() - start)
    return 0
