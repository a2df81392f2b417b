# Models: fit on the training cells, then predict every held-out condition.
# A model's config block may set threads, mem_mb and gpu; the rest are its parameters.


rule fit_model:
    input:
        processed=f"{R}/{{dataset}}/processed.h5ad",
        cells=f"{R}/{{dataset}}/split/cells.tsv",
        conditions=f"{R}/{{dataset}}/split/conditions.tsv",
        features=f"{R}/{{dataset}}/features.tsv",
    output:
        f"{R}/{{dataset}}/models/{{model}}/model.npz",
    params:
        model_params=lambda w: model_params_json(w.model),
        seed=config["seed"],
    log:
        f"{R}/{{dataset}}/logs/fit_{{model}}.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/fit_{{model}}.tsv"
    threads: lambda w: model_block(w.model).get("threads", 1)
    resources:
        mem_mb=lambda w: model_block(w.model).get("mem_mb", 8000),
        gpu=lambda w: model_block(w.model).get("gpu", 0),
    conda:
        "../../envs/models.yaml"
    shell:
        "python -m lingshu fit --processed {input.processed} --cells {input.cells} "
        "--conditions {input.conditions} --features {input.features} "
        "--model {wildcards.model} --params {params.model_params:q} --seed {params.seed} "
        "--out {output} > {log} 2>&1"


rule predict:
    input:
        processed=f"{R}/{{dataset}}/processed.h5ad",
        cells=f"{R}/{{dataset}}/split/cells.tsv",
        conditions=f"{R}/{{dataset}}/split/conditions.tsv",
        truth=f"{R}/{{dataset}}/truth.h5ad",
        features=f"{R}/{{dataset}}/features.tsv",
        model=f"{R}/{{dataset}}/models/{{model}}/model.npz",
    output:
        pred=f"{R}/{{dataset}}/predictions/{{model}}.h5ad",
        features_used=f"{R}/{{dataset}}/predictions/{{model}}.features.tsv",
    params:
        seed=config["seed"],
    log:
        f"{R}/{{dataset}}/logs/predict_{{model}}.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/predict_{{model}}.tsv"
    threads: lambda w: model_block(w.model).get("threads", 1)
    resources:
        mem_mb=lambda w: model_block(w.model).get("mem_mb", 8000),
        gpu=lambda w: model_block(w.model).get("gpu", 0),
    conda:
        "../../envs/models.yaml"
    shell:
        "python -m lingshu predict --processed {input.processed} --cells {input.cells} "
        "--conditions {input.conditions} --truth {input.truth} --model-file {input.model} "
        "--features {input.features} --seed {params.seed} --out {output.pred} "
        "--features-used {output.features_used} > {log} 2>&1"
