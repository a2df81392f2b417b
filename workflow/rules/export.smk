# Export of the frozen split (`snakemake export`, not part of the default target): per dataset,
# what a model run elsewhere may see (training counts, the held-out conditions, the control
# input cells, the perturbation features) and a manifest with their sha256 and the format its
# predictions must have to come back as a `kind: external` entry under `models`.


rule export_dataset:
    input:
        processed=f"{R}/{{dataset}}/processed.h5ad",
        split=lambda w: split_files(w.dataset),
        features=f"{R}/{{dataset}}/features.tsv",
    output:
        export_files("{dataset}"),
    params:
        split=split_dir,
        seed=lambda w: split_seed(w.dataset),
        outdir=lambda w, output: os.path.dirname(output[0]),
    log:
        f"{R}/{{dataset}}/logs/export.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/export.tsv"
    threads: 1
    resources:
        mem_mb=8000,
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m lingshu export --processed {input.processed} --split {params.split} "
        "--features {input.features} --dataset {wildcards.dataset} --seed {params.seed} "
        "--outdir {params.outdir} > {log} 2>&1"


rule export:
    input:
        [f for d in DATASETS for f in export_files(d)],
    localrule: True
