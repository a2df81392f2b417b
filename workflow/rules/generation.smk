# Generation fidelity (SPEC 2.2): generative models sample cells unconditionally; the samples
# are scored against the split's reference cells (real cells no model trained on).


rule generate:
    input:
        processed=f"{R}/{{dataset}}/processed.h5ad",
        cells=f"{R}/{{dataset}}/split/cells.tsv",
        conditions=f"{R}/{{dataset}}/split/conditions.tsv",
        checkpoint=generator_checkpoint,
    output:
        f"{R}/{{dataset}}/generation/{{model}}.h5ad",
    wildcard_constraints:
        model="|".join(sorted(GENERATIVE)),
    params:
        model_params=lambda w: model_params_json(w.model, w.dataset),
        seed=config["seed"],
    log:
        f"{R}/{{dataset}}/logs/generate_{{model}}.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/generate_{{model}}.tsv"
    threads: lambda w: model_block(w.model, w.dataset).get("threads", 1)
    resources:
        mem_mb=lambda w: model_block(w.model, w.dataset).get("mem_mb", 8000),
        gpu=lambda w: model_block(w.model, w.dataset).get("gpu", 0),
    conda:
        model_env
    shell:
        "python -m lingshu generate --processed {input.processed} --cells {input.cells} "
        "--conditions {input.conditions} --model {wildcards.model} "
        "--params {params.model_params:q} --checkpoint {input.checkpoint} "
        "--seed {params.seed} --threads {threads} --out {output} > {log} 2>&1"


rule generation_eval:
    input:
        processed=f"{R}/{{dataset}}/processed.h5ad",
        cells=f"{R}/{{dataset}}/split/cells.tsv",
        conditions=f"{R}/{{dataset}}/split/conditions.tsv",
        generated=lambda w: expand(
            f"{R}/{w.dataset}/generation/{{model}}.h5ad", model=generative_models_of(w.dataset)
        ),
    output:
        table=f"{R}/{{dataset}}/generation/table.tsv",
        markdown=f"{R}/{{dataset}}/generation/table.md",
    params:
        generated=lambda w: " ".join(
            f"{m}={R}/{w.dataset}/generation/{m}.h5ad" for m in generative_models_of(w.dataset)
        ),
        outdir=lambda w, output: os.path.dirname(output.table),
        seed=config["seed"],
    log:
        f"{R}/{{dataset}}/logs/generation_eval.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/generation_eval.tsv"
    threads: 1
    resources:
        mem_mb=8000,
    conda:
        "../../envs/report.yaml"
    shell:
        "python -m lingshu generation-eval --processed {input.processed} --cells {input.cells} "
        "--conditions {input.conditions} --generated {params.generated} "
        "--seed {params.seed} --outdir {params.outdir} > {log} 2>&1"
