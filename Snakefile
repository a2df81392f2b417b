# lingshu-bench: raw counts -> checked AnnData -> split -> models -> predictions -> metrics -> report.
# Config says what to run (config/config.yaml); profiles say where (profiles/).
from snakemake.utils import min_version, validate

from lingshu.failures import report_failures
from lingshu.plan import check_source_files, validate_config

min_version("9.0")


# The default run; a --configfile on the command line replaces it (rather than merging into it,
# so `--configfile config/shared_data.yaml` runs those datasets alone).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


CONFIG_SOURCE = ", ".join(map(str, workflow.configfiles)) or "config"
validate_config(config, source=CONFIG_SOURCE)
validate(config, "workflow/schemas/config.schema.yaml")


# Before any job of a run (not a dry run, which may plan data not obtained yet): every local
# source file exists, so that a wrong `path:` stops the run here, not in its fetch job.
onstart:
    check_source_files(config, CONFIG_SOURCE)


# After a failed run: each failed job's own error (the last line of its log), printed after
# Snakemake's own report so that it is the last thing on the terminal.
onerror:
    report_failures(workflow, log)


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/split.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/screen.smk"
include: "workflow/rules/generation.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/export.smk"


rule all:
    input:
        all_targets(),
    default_target: True
