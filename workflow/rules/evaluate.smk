# Evaluation with cell-eval: every model against the same truth, and the data ceiling.


rule evaluate:
    input:
        truth=f"{R}/{{dataset}}/truth.h5ad",
        pred=f"{R}/{{dataset}}/predictions/{{model}}.h5ad",
    output:
        table=f"{R}/{{dataset}}/eval/{{model}}/per_condition.tsv",
        summary=f"{R}/{{dataset}}/eval/{{model}}/summary.json",
    params:
        outdir=lambda w: f"{R}/{w.dataset}/eval/{w.model}",
    log:
        f"{R}/{{dataset}}/logs/evaluate_{{model}}.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/evaluate_{{model}}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=8000,
    conda:
        "../../envs/evaluate.yaml"
    shell:
        "python -m lingshu evaluate --truth {input.truth} --pred {input.pred} "
        "--outdir {params.outdir} --threads {threads} > {log} 2>&1"


rule ceiling:
    input:
        truth=f"{R}/{{dataset}}/truth.h5ad",
    output:
        table=f"{R}/{{dataset}}/eval/ceiling/per_condition.tsv",
        summary=f"{R}/{{dataset}}/eval/ceiling/summary.json",
    params:
        outdir=lambda w: f"{R}/{w.dataset}/eval/ceiling",
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
        "--outdir {params.outdir} --threads {threads} > {log} 2>&1"
