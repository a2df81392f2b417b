# Candidate screen (datasets with a `screen:` entry): each run of a registered model predicts
# every candidate perturbation, which has no measured cells, in every screened context from
# that context's real control cells, and ranks them by predicted effect (L2 mean shift).
# Candidates it cannot encode are listed as such. The model is loaded as the predict rule
# loads it, with the run's sampling settings.


rule screen:
    input:
        processed=f"{R}/{{dataset}}/processed.h5ad",
        split=lambda w: split_files(w.dataset),
        features=f"{R}/{{dataset}}/features.tsv",
        model=lambda w: f"{R}/{w.dataset}/models/{model_of(w.run)}/model.npz",
        prior=prior_input,
    output:
        f"{R}/{{dataset}}/screen/{{run}}.tsv",
    wildcard_constraints:
        run=_one_of(MODEL_RUNS),
    params:
        sampling=lambda w: sampling_json(w.run, w.dataset),
        entry=lambda w, input: entry_json(
            w.dataset, with_prior=bool(input.prior), screen=plan.SCREEN_KEYS
        ),
        candidates=lambda w: screen_lists(w.dataset),
        split=split_dir,
        seed=config["seed"],
        prior=prior_flag,
    log:
        f"{R}/{{dataset}}/logs/screen_{{run}}.log",
    benchmark:
        f"{R}/{{dataset}}/benchmarks/screen_{{run}}.tsv"
    threads: resource("threads", 1, "run")
    resources:
        mem_mb=resource("mem_mb", 8000, "run"),
        gpu=resource("gpu", 0, "run"),
    conda:
        model_env
    shell:
        "python -m lingshu screen --processed {input.processed} --split {params.split} "
        "--features {input.features} --model-file {input.model} --run {wildcards.run} "
        "--sampling {params.sampling:q} --entry {params.entry:q} --seed {params.seed} "
        "--threads {threads} {params.prior} --out {output} > {log} 2>&1"
