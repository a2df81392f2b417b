# Generation fidelity (SPEC 2.2): generative models sample cells unconditionally; the samples
# are scored against the split's reference cells (real cells no model trained on). The report
# draws the figures.


rule generate:
    input:
        processed=f"{R}/{{dataset}}/processed.h5ad",
        split=lambda w: split_files(w.dataset),
        checkpoint=generator_checkpoint,
    output:
        f"{R}/{{dataset}}/generation/{{run}}.h5ad",
    params:
        training=lambda w: training_json(model_of(w.run), w.dataset),
        sampling=lambda w: generation_json(w.run, w.dataset),
        model=lambda w: model_of(w.run),
        split=split_dir,
        seed=config["seed"],
    log:
        f"{R}/{{dataset}}/logs/generate_{{run}}.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/generate_{{run}}.tsv"
    threads: resource("threads", 1, "run")
    resources:
        mem_mb=resource("mem_mb", 8000, "run"),
        gpu=resource("gpu", 0, "run"),
    conda:
        model_env
    shell:
        "python -m lingshu generate --processed {input.processed} --split {params.split} "
        "--model {params.model} --run {wildcards.run} --params {params.training:q} "
        "--sampling {params.sampling:q} --checkpoint {input.checkpoint} "
        "--seed {params.seed} --threads {threads} --out {output} > {log} 2>&1"


rule generation_eval:
    input:
        processed=f"{R}/{{dataset}}/processed.h5ad",
        split=lambda w: split_files(w.dataset),
        generated=lambda w: expand(
            f"{R}/{w.dataset}/generation/{{run}}.h5ad", run=generation_runs_of(w.dataset)
        ),
    output:
        table=f"{R}/{{dataset}}/generation/table.tsv",
        cell_types=f"{R}/{{dataset}}/generation/cell_types.tsv",
        reference=f"{R}/{{dataset}}/generation/reference.h5ad",
    params:
        generated=lambda w: " ".join(
            f"{r}={R}/{w.dataset}/generation/{r}.h5ad" for r in generation_runs_of(w.dataset)
        ),
        split=split_dir,
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
        "../../envs/evaluate.yaml"
    shell:
        "python -m lingshu generation-eval --processed {input.processed} --split {params.split} "
        "--generated {params.generated} --seed {params.seed} --outdir {params.outdir} "
        "> {log} 2>&1"
