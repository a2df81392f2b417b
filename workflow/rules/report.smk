# Report: per-dataset tables, figures and HTML page; an index page over every dataset.


rule report:
    input:
        truth=f"{R}/{{dataset}}/truth.h5ad",
        evals=lambda w: expand(
            f"{R}/{w.dataset}/eval/{{model}}/summary.json", model=models_of(w.dataset)
        ),
        preds=lambda w: expand(
            f"{R}/{w.dataset}/predictions/{{model}}.h5ad", model=models_of(w.dataset)
        ),
        ceiling=lambda w: (
            [f"{R}/{w.dataset}/eval/ceiling/summary.json"] if config["ceiling"] else []
        ),
        features_used=lambda w: (
            f"{R}/{w.dataset}/predictions/{models_of(w.dataset)[0]}.features.tsv"
        ),
        generation=lambda w: (
            [f"{R}/{w.dataset}/generation/table.tsv"] if generative_models_of(w.dataset) else []
        ),
    output:
        html=f"{R}/{{dataset}}/report/report.html",
        table=f"{R}/{{dataset}}/report/table.tsv",
    params:
        evals=lambda w: " ".join(
            f"{m}={R}/{w.dataset}/eval/{m}" for m in models_of(w.dataset)
        ),
        preds=lambda w: " ".join(
            f"{m}={R}/{w.dataset}/predictions/{m}.h5ad" for m in models_of(w.dataset)
        ),
        ceiling=lambda w: (
            f"--ceiling-dir {R}/{w.dataset}/eval/ceiling" if config["ceiling"] else ""
        ),
        generation=lambda w, input: (
            f"--generation-dir {os.path.dirname(input.generation[0])}" if input.generation else ""
        ),
        benchmarks=lambda w: " ".join(job_names(w.dataset)),
        outdir=lambda w: f"{R}/{w.dataset}/report",
        bootstrap=config["bootstrap"],
        seed=config["seed"],
    log:
        f"{R}/{{dataset}}/logs/report.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/report.tsv"
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "../../envs/report.yaml"
    shell:
        "python -m lingshu report --dataset {wildcards.dataset} --truth {input.truth} "
        "--eval {params.evals} --pred {params.preds} {params.ceiling} "
        "--features-used {input.features_used} {params.generation} "
        "--benchmarks {params.benchmarks} --bootstrap {params.bootstrap} "
        "--seed {params.seed} --outdir {params.outdir} > {log} 2>&1"


rule index:
    input:
        tables=expand(f"{R}/{{dataset}}/report/table.tsv", dataset=DATASETS),
    output:
        f"{R}/index.html",
    params:
        datasets=" ".join(DATASETS),
        results=lambda w, output: os.path.dirname(output[0]),
    log:
        f"{R}/logs/index.log",
    benchmark:
        f"{R}/benchmarks/index.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../../envs/report.yaml"
    shell:
        "python -m lingshu index --results {params.results} --datasets {params.datasets} "
        "--out {output} > {log} 2>&1"
