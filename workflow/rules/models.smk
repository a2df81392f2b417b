# Models: (pre-train,) fit on the training cells, then predict every held-out condition once per
# run (the model, and each of its sampling variants). Pre-train and fit get a model's training
# settings only; predict gets the run's sampling settings, so a sampling change never retrains.
# A model's config block may set threads, mem_mb and gpu (Snakemake resources). An external
# entry (`kind: external`) has none of these jobs: its file is checked and converted instead.


rule tokenize:
    # the long chains (Lingshu-Cell's tokens -> pre-training -> fine-tuning) start first, so
    # that short jobs fill the cores at the end rather than wait behind them
    priority: 10
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
    priority: 10  # see tokenize
    input:
        processed=f"{R}/{{dataset}}/processed.h5ad",
        split=lambda w: split_files(w.dataset),
        features=f"{R}/{{dataset}}/features.tsv",
        tokens=token_input,
    output:
        f"{R}/{{dataset}}/models/{{model}}/pretrain.pt",
    params:
        training=lambda w: pretraining_json(w.model, w.dataset),
        entry=lambda w: entry_json(w.dataset),
        split=split_dir,
        seed=config["seed"],
        workdir=lambda w, output: os.path.dirname(output[0]),
        launcher=launcher,
        tokens=token_flag,
    log:
        f"{R}/{{dataset}}/logs/pretrain_{{model}}.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/pretrain_{{model}}.tsv"
    threads: resource("threads", 2)
    resources:
        mem_mb=resource("mem_mb", 8000),
        gpu=resource("gpu", 0),
    conda:
        model_env
    shell:
        "{params.launcher} pretrain --processed {input.processed} --split {params.split} "
        "--features {input.features} --model {wildcards.model} --params {params.training:q} "
        "--entry {params.entry:q} --seed {params.seed} --threads {threads} "
        "--workdir {params.workdir} {params.tokens} --out {output} > {log} 2>&1"


rule fit_model:
    priority: 10  # see tokenize
    input:
        processed=f"{R}/{{dataset}}/processed.h5ad",
        split=lambda w: split_files(w.dataset),
        features=f"{R}/{{dataset}}/features.tsv",
        pretrained=lambda w: (
            [f"{R}/{w.dataset}/models/{w.model}/pretrain.pt"] if pretraining(w.model) else []
        ),
        tokens=token_input,
    output:
        f"{R}/{{dataset}}/models/{{model}}/model.npz",
    params:
        training=lambda w: training_json(w.model, w.dataset),
        entry=lambda w: entry_json(w.dataset),
        split=split_dir,
        init=lambda w, input: " ".join(f"--init {p}" for p in input.pretrained),
        seed=config["seed"],
        workdir=lambda w, output: os.path.dirname(output[0]),
        launcher=launcher,
        tokens=token_flag,
    log:
        f"{R}/{{dataset}}/logs/fit_{{model}}.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/fit_{{model}}.tsv"
    threads: resource("threads", 1)
    resources:
        mem_mb=resource("mem_mb", 8000),
        gpu=resource("gpu", 0),
    conda:
        model_env
    shell:
        "{params.launcher} fit --processed {input.processed} --split {params.split} "
        "--features {input.features} --model {wildcards.model} --params {params.training:q} "
        "--entry {params.entry:q} --seed {params.seed} --threads {threads} "
        "--workdir {params.workdir} {params.init} {params.tokens} --out {output} > {log} 2>&1"


rule predict:
    input:
        processed=f"{R}/{{dataset}}/processed.h5ad",
        split=lambda w: split_files(w.dataset),
        model=lambda w: f"{R}/{w.dataset}/models/{model_of(w.run)}/model.npz",
        prior=prior_input,
    output:
        f"{R}/{{dataset}}/predictions/{{run}}.h5ad",
    wildcard_constraints:
        run=_one_of(MODEL_RUNS),
    params:
        sampling=lambda w: sampling_json(w.run, w.dataset),
        entry=lambda w, input: entry_json(w.dataset, with_prior=bool(input.prior)),
        split=split_dir,
        seed=config["seed"],
        prior=prior_flag,
    log:
        f"{R}/{{dataset}}/logs/predict_{{run}}.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/predict_{{run}}.tsv"
    threads: resource("threads", 1, "run")
    resources:
        mem_mb=resource("mem_mb", 8000, "run"),
        gpu=resource("gpu", 0, "run"),
    conda:
        model_env
    shell:
        "python -m lingshu predict --processed {input.processed} --split {params.split} "
        "--model-file {input.model} --run {wildcards.run} --sampling {params.sampling:q} "
        "--entry {params.entry:q} --seed {params.seed} --threads {threads} {params.prior} "
        "--out {output} > {log} 2>&1"


# Predictions made outside this pipeline (a `kind: external` entry): the user's file (never
# modified) is checked against the truth and the split and written in the predict rule's format.
rule external_prediction:
    input:
        source=external_source,
        truth=f"{R}/{{dataset}}/truth.h5ad",
        split=lambda w: split_files(w.dataset),
    output:
        f"{R}/{{dataset}}/predictions/{{run}}.h5ad",
    wildcard_constraints:
        run=_one_of(EXTERNAL_RUNS),
    params:
        values=lambda w: model_block(w.run)["values"],
        note=lambda w: model_block(w.run).get("note", ""),
        split=split_dir,
    log:
        f"{R}/{{dataset}}/logs/external_prediction_{{run}}.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/external_prediction_{{run}}.tsv"
    threads: 1
    resources:
        mem_mb=8000,
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m lingshu external --source {input.source:q} --values {params.values} "
        "--truth {input.truth} --split {params.split} --run {wildcards.run} "
        "--note={params.note:q} --out {output} > {log} 2>&1"
