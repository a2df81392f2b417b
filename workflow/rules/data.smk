# Data: simulate the embedded default data, or download / link a source; then preprocess.


rule simulate_dataset:
    output:
        f"{R}/{{dataset}}/raw/simulated.h5ad",
    params:
        sim=lambda w: json.dumps(entry(w.dataset)["source"]["simulate"], sort_keys=True),
        seed=config["seed"],
    log:
        f"{R}/{{dataset}}/logs/simulate.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/simulate.tsv"
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m lingshu simulate --params {params.sim:q} --seed {params.seed} "
        "--out {output} > {log} 2>&1"


rule fetch_dataset:
    output:
        f"{R}/{{dataset}}/raw/source.h5ad",
    params:
        source=lambda w: json.dumps(entry(w.dataset)["source"], sort_keys=True),
    log:
        f"{R}/{{dataset}}/logs/fetch.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/fetch.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    retries: 1
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m lingshu fetch --source {params.source:q} --out {output} > {log} 2>&1"


rule preprocess:
    input:
        raw_input,
    output:
        f"{R}/{{dataset}}/processed.h5ad",
    params:
        entry=lambda w: entry_json(w.dataset),
    log:
        f"{R}/{{dataset}}/logs/preprocess.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/preprocess.tsv"
    threads: 1
    resources:
        mem_mb=8000,
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m lingshu preprocess --raw {input} --entry {params.entry:q} "
        "--out {output} > {log} 2>&1"


# Prior injection (SPEC 1.4): external data of the same targets -> each perturbation's prior genes.


rule fetch_prior:
    output:
        f"{R}/{{dataset}}/prior/source.h5ad",
    params:
        source=lambda w: json.dumps(entry(w.dataset)["prior"]["source"], sort_keys=True),
    log:
        f"{R}/{{dataset}}/logs/fetch_prior.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/fetch_prior.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    retries: 1
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m lingshu fetch --source {params.source:q} --out {output} > {log} 2>&1"


rule prior:
    input:
        external=f"{R}/{{dataset}}/prior/source.h5ad",
        processed=f"{R}/{{dataset}}/processed.h5ad",
    output:
        f"{R}/{{dataset}}/prior/genes.tsv",
    params:
        entry=lambda w: entry_json(w.dataset, with_prior=True),
    log:
        f"{R}/{{dataset}}/logs/prior.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/prior.tsv"
    threads: 1
    resources:
        mem_mb=8000,
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m lingshu prior --external {input.external} --processed {input.processed} "
        "--entry {params.entry:q} --out {output} > {log} 2>&1"
