"""The workflow itself: lint, dry runs, pinned environments."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _snakemake(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_lint_is_clean():
    run = _snakemake("--lint")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "good condition" in run.stdout + run.stderr


@pytest.mark.parametrize("configfile", [None, "config/shared_data.yaml", "config/perturbench.yaml",
                                        "config/paper/vcc_h1.yaml",
                                        "config/paper/pbmc_cytokines.yaml",
                                        "config/paper/kang_gpu.yaml"])
def test_dry_run_builds_every_stage(configfile, tmp_path):
    # An empty results folder, so that the dry run plans every job whatever exists already.
    args = ["-n", "--quiet", "rules", "--config", f"results_dir={tmp_path}"]
    args += ["--configfile", configfile] if configfile else []
    run = _snakemake(*args)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout + run.stderr
    for rule in ("preprocess", "split", "truth", "features", "fit_model", "predict",
                 "evaluate", "ceiling", "generate", "generation_eval", "report", "index"):
        assert re.search(rf"\b{rule}\b", out), rule


def test_the_gpu_kang_config_has_the_shared_data_entry_and_seed():
    """config/paper/kang_gpu.yaml says its split is the CPU run's: same entry, same seed."""
    gpu = yaml.safe_load((ROOT / "config" / "paper" / "kang_gpu.yaml").read_text())
    cpu = yaml.safe_load((ROOT / "config" / "shared_data.yaml").read_text())
    assert gpu["datasets"]["kang"] == cpu["datasets"]["kang"]
    assert gpu["seed"] == cpu["seed"]


def test_dataset_model_params_reach_that_dataset_only(tmp_path):
    config = yaml.safe_load((ROOT / "config" / "shared_data.yaml").read_text())
    config["datasets"]["kang"]["model_params"] = {"lingshu": {"guidance": 3.0}}
    path = tmp_path / "kang_w3.yaml"
    path.write_text(yaml.safe_dump(dict(config, results_dir=str(tmp_path))))
    run = _snakemake("-n", "-p", "--configfile", str(path))
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    predicts = [line for line in lines if "lingshu predict" in line and "--run lingshu " in line]
    kang = [line for line in predicts if "/kang/" in line]
    assert len(predicts) == 2 and len(kang) == 1
    assert '"guidance": 3.0' in kang[0]
    assert '"guidance": 1.0' in next(line for line in predicts if "/papalexi/" in line)
    # Guidance is a sampling setting: the training jobs never see it, so both datasets'
    # Lingshu-Cell fits get the same settings.
    fits = [line for line in lines if "lingshu fit" in line and "--model lingshu" in line]
    assert len(fits) == 2 and not any("guidance" in line for line in fits)
    settings = {line.split("--params ")[1].split("' ")[0] for line in fits}
    assert len(settings) == 1


def test_the_candidate_screen_plans_one_job_per_run_of_a_dataset_with_a_screen(tmp_path):
    # The default config screens candidates in sim_genetic only.
    run = _snakemake("-n", "-p", "--config", f"results_dir={tmp_path}")
    assert run.returncode == 0, run.stdout + run.stderr
    screens = [line for line in run.stdout.splitlines() if "lingshu screen " in line]
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    assert "screen" in cfg["datasets"]["sim_genetic"]
    assert "screen" not in cfg["datasets"]["sim_stimulation"]
    assert len(screens) == len(cfg["models"])
    assert all("/sim_genetic/" in line for line in screens)
    outputs = {re.search(r"--out (\S+)", line).group(1) for line in screens}
    assert outputs == {f"{tmp_path}/sim_genetic/screen/{m}.tsv" for m in cfg["models"]}
    report = next(line for line in run.stdout.splitlines()
                  if "lingshu report" in line and "--dataset sim_genetic" in line)
    assert "--screen control_mean=" in report
    assert f" linear={tmp_path}/sim_genetic/screen/linear.tsv" in report
    assert not any("screen/" in line for line in run.stdout.splitlines()
                   if "lingshu report" in line and "--dataset sim_stimulation" in line)


def test_a_bad_config_stops_before_any_job(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["datasets"]["sim_genetic"]["split"]["kind"] = "sideways"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    run = _snakemake("-n", "--configfile", str(bad))
    assert run.returncode != 0
    out = run.stdout + run.stderr
    assert "datasets.sim_genetic.split.kind" in out and "Fix:" in out


def _pyproject_pins():
    text = (ROOT / "pyproject.toml").read_text()
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', text))


@pytest.mark.parametrize("env", sorted((ROOT / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_conda_envs_pin_the_pyproject_versions(env):
    pins = _pyproject_pins()
    spec = yaml.safe_load(env.read_text())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
    assert pip, env
    for line in pip:
        name, version = line.split("==")
        assert pins.get(name) == version, f"{env.name}: {line} differs from pyproject.toml"


def test_a_multi_gpu_model_block_launches_torchrun(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["models"]["lingshu"]["gpu"] = 4
    cfg["models"]["scldm"]["gpu"] = 4  # not DDP-capable: one process
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = _snakemake("-n", "-p", "--configfile", str(path), "--resources", "gpu=4")
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    lingshu = [x for x in lines if "--model lingshu" in x and (" fit " in x or " pretrain " in x)]
    scldm = [x for x in lines if "--model scldm" in x and " fit " in x]
    assert lingshu and all("torchrun --standalone --nproc_per_node=4 -m lingshu" in x
                           for x in lingshu)
    assert scldm and all("python -m lingshu fit" in x and "torchrun" not in x for x in scldm)


def test_prior_injection_adds_the_prior_rules(tmp_path):
    """A dataset with a prior and Lingshu-Cell's prior_injection: fetch_prior -> prior ->
    predict_lingshu --prior; the other models and datasets are untouched."""
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["datasets"]["sim_genetic"]["prior"] = {
        "source": {"path": str(tmp_path / "other_lines.h5ad")},
        "columns": {"perturbation": "gene", "control": "non-targeting", "context": "line"}}
    cfg["datasets"]["sim_genetic"]["model_params"] = {"lingshu": {"prior_injection": True}}
    path = tmp_path / "prior.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = _snakemake("-n", "-p", "--configfile", str(path))
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    predicts = [x for x in lines if "lingshu predict" in x]
    with_prior = [x for x in predicts if "--prior " in x]
    assert len(with_prior) == 1 and "sim_genetic/prior/genes.tsv" in with_prior[0]
    assert "--model-file " + str(tmp_path / "results/sim_genetic/models/lingshu") in with_prior[0]
    assert any("lingshu prior --external" in x for x in lines)
    assert any("lingshu fetch" in x and "other_lines.h5ad" in x for x in lines)


def test_an_external_entry_plans_its_own_job_and_the_export_is_a_target_of_its_own(tmp_path):
    """An external entry: one external_prediction job per dataset (never predict, fit or
    generate for it), evaluated and reported like any run; `export` is not in the default
    target and plans one export job per dataset."""
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["models"]["mine"] = {"kind": "external", "values": "counts",
                             "path": str(tmp_path / "preds" / "{dataset}.h5ad")}
    (tmp_path / "preds").mkdir()
    for name in cfg["datasets"]:
        (tmp_path / "preds" / f"{name}.h5ad").touch()
    path = tmp_path / "external.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = _snakemake("-n", "-p", "--configfile", str(path))
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout + run.stderr
    assert "export" not in re.findall(r"^(\w+)\s+\d+$", out, re.M)
    lines = run.stdout.splitlines()
    external = [x for x in lines if "lingshu external" in x]
    n_all = sum("models" not in d for d in cfg["datasets"].values())  # datasets run by every model
    assert len(external) == n_all and all("--run mine " in x for x in external)
    assert not any("--run mine" in x or "--model mine" in x for x in lines
                   if "lingshu predict" in x or "lingshu fit" in x or "lingshu generate" in x)
    assert any("lingshu evaluate" in x and "predictions/mine.h5ad" in x for x in lines)
    assert any("lingshu report" in x and "mine=" in x for x in lines)
    run = _snakemake("export", "-n", "-p", "--configfile", str(path))
    assert run.returncode == 0, run.stdout + run.stderr
    exports = [x for x in run.stdout.splitlines() if "lingshu export" in x]
    assert len(exports) == len(cfg["datasets"])
    assert not any("lingshu external" in x for x in run.stdout.splitlines())


# -- what a user sees when a run fails ----------------------------------------------------------


def _run_in(tmp_path, cfg, *targets):
    """A real run (not a dry run) of the workflow with ``cfg``, in its own working directory
    (its own lock and metadata), results under ``tmp_path/results``."""
    cfg["results_dir"] = str(tmp_path / "results")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return _snakemake("-s", str(ROOT / "Snakefile"), "-d", str(tmp_path), "--configfile",
                      str(path), "--cores", "1", *targets)


def test_a_missing_source_file_stops_a_run_before_any_job(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["datasets"]["sim_genetic"]["source"] = {"path": "data/screen.h5ad"}
    run = _run_in(tmp_path, cfg)
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert "datasets.sim_genetic.source.path: 'data/screen.h5ad' does not exist" in out, out
    assert not (tmp_path / "results").exists()  # no job ran (the simulated dataset's neither)
    assert "Execute" not in out


def test_a_failed_job_s_own_error_is_the_last_thing_printed(tmp_path):
    """A near-miss control label: the preprocess job fails; after Snakemake's own report the
    run prints the job, its log and the log's ERROR line (with the "did you mean" hint)."""
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["datasets"]["sim_genetic"]["columns"]["control"] = "Control"
    run = _run_in(tmp_path, cfg, str(tmp_path / "results/sim_genetic/processed.h5ad"))
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    at = max(i for i, line in enumerate(lines) if "At least one job did not complete" in line)
    tail = "\n".join(lines[at + 1:])
    assert "* preprocess (dataset=sim_genetic)" in tail, run.stderr[-3000:]
    assert "results/sim_genetic/logs/preprocess.log" in tail
    error = next(line.strip() for line in lines[at + 1:] if line.strip().startswith("ERROR:"))
    assert error.startswith("ERROR: config: datasets.sim_genetic (source.simulate")
    assert "did you mean 'control'" in error and "Fix: set `columns.control: control`" in error
    assert "--unlock" in tail
    log = (tmp_path / "results/sim_genetic/logs/preprocess.log").read_text().strip()
    assert log.splitlines()[-1] == error  # the job's log ends with it


def test_failure_report_reads_each_failed_job_s_log(tmp_path):
    import io
    from types import SimpleNamespace

    from lingshu.failures import log_tail, parse_snakemake_log, report_failures

    log = tmp_path / "fit.log"
    log.write_text("step 1\ntrain:  10%|#| 1/10 [00:01<00:09]\rtrain:  20%|##| 2/10 [00:02<00:08]\n"
                   "Traceback (most recent call last):\n  ...\n"
                   "\nERROR: lingshu fit failed: RuntimeError: boom (the traceback above says "
                   "where)\n")
    assert log_tail(log) == ["ERROR: lingshu fit failed: RuntimeError: boom (the traceback "
                             "above says where)"]
    killed = tmp_path / "killed.log"
    killed.write_text("train:  10%|#| 1/10\rtrain:  20%|##| 2/10\n")
    assert log_tail(killed) == ["train:  20%|##| 2/10"]  # the bar's last state
    job = SimpleNamespace(rule=SimpleNamespace(name="fit_model"),
                          wildcards_dict={"dataset": "kang", "model": "lingshu"}, log=[str(log)])
    gone = SimpleNamespace(rule=SimpleNamespace(name="fit_model"),
                           wildcards_dict={"dataset": "kang", "model": "scldm"},
                           log=[str(killed)])
    stream = io.StringIO()
    workflow = SimpleNamespace(scheduler=SimpleNamespace(failed=[gone, job]))
    report_failures(workflow, stream=stream, at_exit=False)
    text = stream.getvalue()
    assert "2 job(s) failed" in text
    assert text.index("* fit_model (dataset=kang, model=lingshu)") < text.index("RuntimeError")
    assert "may have been killed" in text and "train:  20%" in text
    # without the scheduler: the "Error in rule" blocks of Snakemake's own log
    smk = tmp_path / "run.snakemake.log"
    smk.write_text("Error in rule fit_model:\n    message: None\n    jobid: 3\n"
                   f"    log: {log} (check log file(s) for error details)\n"
                   "    wildcards: dataset=kang, model=lingshu\n    shell:\n        python ...\n"
                   "Error in rule fit_model:\n    message: None\n"
                   f"    log: {log} (check log file(s) for error details)\n"
                   "    wildcards: dataset=kang, model=lingshu\n")
    jobs = parse_snakemake_log(smk.read_text())
    assert [(j.rule, j.wildcards, j.logs) for j in jobs] == [
        ("fit_model", {"dataset": "kang", "model": "lingshu"}, [str(log)])]
    stream = io.StringIO()
    report_failures(SimpleNamespace(), [str(smk)], stream=stream, at_exit=False)
    assert "RuntimeError: boom" in stream.getvalue()
    stream = io.StringIO()
    report_failures(SimpleNamespace(), [], stream=stream, at_exit=False)
    assert stream.getvalue() == ""  # nothing failed: nothing printed
