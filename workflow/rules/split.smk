# Split: held-out conditions, the evaluation truth, and the perturbation features every model shares.


rule split:
    input:
        f"{R}/{{dataset}}/processed.h5ad",
    output:
        split_files("{dataset}"),
    params:
        entry=lambda w: entry_json(w.dataset),
        seed=config["seed"],
        lists=lambda w: split_lists(w.dataset),
        outdir=lambda w, output: os.path.dirname(output[0]),
        # how splits are drawn (lingshu.constants): a new version re-makes older splits
        version=SPLIT_VERSION,
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
        "python -m lingshu split --processed {input} --entry {params.entry:q} "
        "--seed {params.seed} --out {params.outdir} > {log} 2>&1"


rule truth:
    input:
        processed=f"{R}/{{dataset}}/processed.h5ad",
        split=lambda w: split_files(w.dataset),
    output:
        f"{R}/{{dataset}}/truth.h5ad",
    params:
        split=split_dir,
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
        "python -m lingshu truth --processed {input.processed} --split {params.split} "
        "--out {output} > {log} 2>&1"


rule features:
    input:
        processed=f"{R}/{{dataset}}/processed.h5ad",
        split=lambda w: split_files(w.dataset),
    output:
        features=f"{R}/{{dataset}}/features.tsv",
        used=f"{R}/{{dataset}}/features_used.tsv",
    params:
        # A screen's candidates get features too (so every model is fitted knowing them).
        entry=lambda w: entry_json(w.dataset, screen=plan.CANDIDATE_KEYS),
        candidates=lambda w: screen_lists(w.dataset),
        split=split_dir,
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
        "python -m lingshu features --processed {input.processed} --split {params.split} "
        "--entry {params.entry:q} --seed {params.seed} --out {output.features} "
        "--out-used {output.used} > {log} 2>&1"
