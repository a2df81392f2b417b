# Split: held-out conditions, the evaluation truth, and the perturbation features every model shares.


rule split:
    input:
        f"{R}/{{dataset}}/processed.h5ad",
    output:
        cells=f"{R}/{{dataset}}/split/cells.tsv",
        conditions=f"{R}/{{dataset}}/split/conditions.tsv",
    params:
        spec=lambda w: json.dumps(entry(w.dataset)["split"], sort_keys=True),
        seed=lambda w: split_seed(w.dataset),
        where=lambda w: f"config: datasets.{w.dataset}",
        lists=lambda w: split_lists(w.dataset),
    log:
        f"{R}/{{dataset}}/logs/split.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/split.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m lingshu split --processed {input} --spec {params.spec:q} "
        "--seed {params.seed} --where {params.where:q} --cells {output.cells} "
        "--conditions {output.conditions} > {log} 2>&1"


rule truth:
    input:
        processed=f"{R}/{{dataset}}/processed.h5ad",
        cells=f"{R}/{{dataset}}/split/cells.tsv",
        conditions=f"{R}/{{dataset}}/split/conditions.tsv",
    output:
        f"{R}/{{dataset}}/truth.h5ad",
    log:
        f"{R}/{{dataset}}/logs/truth.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/truth.tsv"
    threads: 1
    resources:
        mem_mb=8000,
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m lingshu truth --processed {input.processed} --cells {input.cells} "
        "--conditions {input.conditions} --out {output} > {log} 2>&1"


rule features:
    input:
        processed=f"{R}/{{dataset}}/processed.h5ad",
        cells=f"{R}/{{dataset}}/split/cells.tsv",
        conditions=f"{R}/{{dataset}}/split/conditions.tsv",
    output:
        f"{R}/{{dataset}}/features.tsv",
    params:
        entry=lambda w: entry_json(w.dataset),
        seed=config["seed"],
    log:
        f"{R}/{{dataset}}/logs/features.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/features.tsv"
    threads: 1
    resources:
        mem_mb=8000,
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m lingshu features --processed {input.processed} --cells {input.cells} "
        "--conditions {input.conditions} --entry {params.entry:q} --seed {params.seed} "
        "--out {output} > {log} 2>&1"
