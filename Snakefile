# lingshu-bench: raw counts -> checked AnnData -> split -> models -> predictions -> metrics -> report.
# Config says what to run (config/config.yaml); profiles say where (profiles/).
from snakemake.utils import min_version, validate

from lingshu.plan import validate_config

min_version("9.0")


# The default run; a --configfile on the command line replaces it (rather than merging into it,
# so `--configfile config/shared_data.yaml` runs those datasets alone).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


validate_config(config, source=", ".join(map(str, workflow.configfiles)) or "config")
validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/split.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/generation.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        all_targets(),
    default_target: True
