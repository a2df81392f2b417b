# Models: (pre-train,) fit on the training cells, then predict every held-out condition.
# A model's config block may set threads, mem_mb and gpu; the rest are its parameters.


rule tokenize:
    input:
        f"{R}/{{dataset}}/processed.h5ad",
    output:
        directory(f"{R}/{{dataset}}/tokens"),
    log:
        f"{R}/{{dataset}}/logs/tokenize.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/tokenize.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../../envs/models.yaml"
    shell:
        "python -m lingshu tokenize --processed {input} --out {output} > {log} 2>&1"


rule pretrain_model:
    input:
        processed=f"{R}/{{dataset}}/processed.h5ad",
        cells=f"{R}/{{dataset}}/split/cells.tsv",
        conditions=f"{R}/{{dataset}}/split/conditions.tsv",
        features=f"{R}/{{dataset}}/features.tsv",
        tokens=token_input,
    output:
        f"{R}/{{dataset}}/models/{{model}}/pretrain.pt",
    params:
        model_params=lambda w: model_params_json(w.model, w.dataset),
        entry=lambda w: entry_json(w.dataset),
        seed=config["seed"],
        workdir=lambda w, output: os.path.dirname(output[0]),
        launcher=launcher,
        tokens=token_flag,
    log:
        f"{R}/{{dataset}}/logs/pretrain_{{model}}.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/pretrain_{{model}}.tsv"
    threads: lambda w: model_block(w.model, w.dataset).get("threads", 2)
    resources:
        mem_mb=lambda w: model_block(w.model, w.dataset).get("mem_mb", 8000),
        gpu=lambda w: model_block(w.model, w.dataset).get("gpu", 0),
    conda:
        model_env
    shell:
        "{params.launcher} pretrain --processed {input.processed} --cells {input.cells} "
        "--conditions {input.conditions} --features {input.features} "
        "--model {wildcards.model} --params {params.model_params:q} --entry {params.entry:q} "
        "--seed {params.seed} --threads {threads} --workdir {params.workdir} {params.tokens} "
        "--out {output} > {log} 2>&1"


rule fit_model:
    input:
        processed=f"{R}/{{dataset}}/processed.h5ad",
        cells=f"{R}/{{dataset}}/split/cells.tsv",
        conditions=f"{R}/{{dataset}}/split/conditions.tsv",
        features=f"{R}/{{dataset}}/features.tsv",
        pretrained=lambda w: (
            [f"{R}/{w.dataset}/models/{w.model}/pretrain.pt"]
            if w.model in PRETRAINING
            else []
        ),
        tokens=token_input,
    output:
        f"{R}/{{dataset}}/models/{{model}}/model.npz",
    params:
        model_params=lambda w: model_params_json(w.model, w.dataset),
        entry=lambda w: entry_json(w.dataset),
        init=lambda w, input: " ".join(f"--init {p}" for p in input.pretrained),
        seed=config["seed"],
        workdir=lambda w, output: os.path.dirname(output[0]),
        launcher=launcher,
        tokens=token_flag,
    log:
        f"{R}/{{dataset}}/logs/fit_{{model}}.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/fit_{{model}}.tsv"
    threads: lambda w: model_block(w.model, w.dataset).get("threads", 1)
    resources:
        mem_mb=lambda w: model_block(w.model, w.dataset).get("mem_mb", 8000),
        gpu=lambda w: model_block(w.model, w.dataset).get("gpu", 0),
    conda:
        model_env
    shell:
        "{params.launcher} fit --processed {input.processed} --cells {input.cells} "
        "--conditions {input.conditions} --features {input.features} "
        "--model {wildcards.model} --params {params.model_params:q} --entry {params.entry:q} "
        "--seed {params.seed} --threads {threads} --workdir {params.workdir} {params.init} "
        "{params.tokens} --out {output} > {log} 2>&1"


rule predict:
    input:
        processed=f"{R}/{{dataset}}/processed.h5ad",
        cells=f"{R}/{{dataset}}/split/cells.tsv",
        conditions=f"{R}/{{dataset}}/split/conditions.tsv",
        truth=f"{R}/{{dataset}}/truth.h5ad",
        features=f"{R}/{{dataset}}/features.tsv",
        model=f"{R}/{{dataset}}/models/{{model}}/model.npz",
        prior=prior_input,
    output:
        pred=f"{R}/{{dataset}}/predictions/{{model}}.h5ad",
        features_used=f"{R}/{{dataset}}/predictions/{{model}}.features.tsv",
    params:
        seed=config["seed"],
        prior=prior_flag,
        entry=lambda w: entry_json(w.dataset),
    log:
        f"{R}/{{dataset}}/logs/predict_{{model}}.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/predict_{{model}}.tsv"
    threads: lambda w: model_block(w.model, w.dataset).get("threads", 1)
    resources:
        mem_mb=lambda w: model_block(w.model, w.dataset).get("mem_mb", 8000),
        gpu=lambda w: model_block(w.model, w.dataset).get("gpu", 0),
    conda:
        model_env
    shell:
        "python -m lingshu predict --processed {input.processed} --cells {input.cells} "
        "--conditions {input.conditions} --truth {input.truth} --model-file {input.model} "
        "--features {input.features} --seed {params.seed} --threads {threads} "
        "--out {output.pred} {params.prior} --entry {params.entry:q} "
        "--features-used {output.features_used} > {log} 2>&1"
