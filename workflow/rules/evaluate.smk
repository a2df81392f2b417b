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
