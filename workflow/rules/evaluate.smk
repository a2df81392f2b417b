# Evaluation with cell-eval: every run against the same truth (the evaluation adds the real
# control cells to each prediction itself), the distribution of each run's predicted cells per
# held-out condition, and the data ceiling.


rule evaluate:
    input:
        truth=f"{R}/{{dataset}}/truth.h5ad",
        pred=f"{R}/{{dataset}}/predictions/{{run}}.h5ad",
    output:
        table=f"{R}/{{dataset}}/eval/{{run}}/per_condition.tsv",
        summary=f"{R}/{{dataset}}/eval/{{run}}/summary.json",
        distribution=f"{R}/{{dataset}}/eval/{{run}}/distribution.tsv",
    params:
        outdir=lambda w: f"{R}/{w.dataset}/eval/{w.run}",
        seed=config["seed"],
    log:
        f"{R}/{{dataset}}/logs/evaluate_{{run}}.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/evaluate_{{run}}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=8000,
    conda:
        "../../envs/evaluate.yaml"
    shell:
        "python -m lingshu evaluate --truth {input.truth} --pred {input.pred} "
        "--outdir {params.outdir} --threads {threads} --seed {params.seed} > {log} 2>&1"


rule ceiling:
    input:
        truth=f"{R}/{{dataset}}/truth.h5ad",
    output:
        table=f"{R}/{{dataset}}/eval/ceiling/per_condition.tsv",
        summary=f"{R}/{{dataset}}/eval/ceiling/summary.json",
    params:
        outdir=lambda w: f"{R}/{w.dataset}/eval/ceiling",
        seed=config["seed"],
    log:
        f"{R}/{{dataset}}/logs/ceiling.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/ceiling.tsv"
    threads: config["threads"]
    resources:
        mem_mb=8000,
    conda:
        "../../envs/evaluate.yaml"
    shell:
        "python -m lingshu evaluate --truth {input.truth} --ceiling "
        "--outdir {params.outdir} --threads {threads} --seed {params.seed} > {log} 2>&1"


# Screening: does each run find the strong hits among the held-out conditions? Its predicted
# effect of each condition (L2 mean shift, energy distance, DE genes against the real controls)
# against the measured one; Spearman, precision/recall@k and AUPRC with bootstrap intervals,
# and the split-half data ceiling. Every dataset: with fewer than 4 held-out conditions (known
# only once the split is made) the score table is empty and the report says why.
rule screening:
    input:
        truth=f"{R}/{{dataset}}/truth.h5ad",
        preds=lambda w: expand(f"{R}/{w.dataset}/predictions/{{run}}.h5ad", run=runs_of(w.dataset)),
    output:
        table=f"{R}/{{dataset}}/eval/screening.tsv",
        effects=f"{R}/{{dataset}}/eval/screening_effects.tsv",
    params:
        preds=lambda w: " ".join(
            f"{r}={R}/{w.dataset}/predictions/{r}.h5ad" for r in runs_of(w.dataset)
        ),
        ceiling="" if config["ceiling"] else "--no-ceiling",
        bootstrap=config["bootstrap"],
        seed=config["seed"],
    log:
        f"{R}/{{dataset}}/logs/screening.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/screening.tsv"
    threads: 1
    resources:
        mem_mb=8000,
    conda:
        "../../envs/evaluate.yaml"
    shell:
        "python -m lingshu screening --truth {input.truth} --pred {params.preds} "
        "--table {output.table} --effects {output.effects} --bootstrap {params.bootstrap} "
        "--seed {params.seed} {params.ceiling} > {log} 2>&1"
