# Report: per-dataset tables, figures and HTML page; an index page over every dataset.


rule report:
    input:
        truth=f"{R}/{{dataset}}/truth.h5ad",
        evals=lambda w: expand(f"{R}/{w.dataset}/eval/{{run}}/summary.json", run=runs_of(w.dataset)),
        preds=lambda w: expand(f"{R}/{w.dataset}/predictions/{{run}}.h5ad", run=runs_of(w.dataset)),
        ceiling=lambda w: (
            [f"{R}/{w.dataset}/eval/ceiling/summary.json"] if config["ceiling"] else []
        ),
        features_used=f"{R}/{{dataset}}/features_used.tsv",
        generation=lambda w: (
            [f"{R}/{w.dataset}/generation/table.tsv"] if generation_runs_of(w.dataset) else []
        ),
        screening=f"{R}/{{dataset}}/eval/screening.tsv",
        screening_effects=f"{R}/{{dataset}}/eval/screening_effects.tsv",
        screen=lambda w: screen_files(w.dataset),
    output:
        html=f"{R}/{{dataset}}/report/report.html",
        table=f"{R}/{{dataset}}/report/table.tsv",
        screening=f"{R}/{{dataset}}/report/screening.tsv",
    params:
        evals=lambda w: " ".join(f"{r}={R}/{w.dataset}/eval/{r}" for r in runs_of(w.dataset)),
        preds=lambda w: " ".join(
            f"{r}={R}/{w.dataset}/predictions/{r}.h5ad" for r in runs_of(w.dataset)
        ),
        ceiling=lambda w: (
            f"--ceiling-dir {R}/{w.dataset}/eval/ceiling" if config["ceiling"] else ""
        ),
        generation=lambda w, input: (
            f"--generation-dir {os.path.dirname(input.generation[0])}" if input.generation else ""
        ),
        screening=lambda w, input: os.path.dirname(input.screening),
        screen=lambda w: " ".join(
            f"{r}={R}/{w.dataset}/screen/{r}.tsv" for r in screen_runs_of(w.dataset)
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
        "--screening-dir {params.screening} --screen {params.screen} "
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
