"""Names shared by every stage: canonical obs columns and labels of the processed data.

After preprocessing every dataset, whatever its original column names, has:

- ``obs['perturbation']``: the perturbation label, control cells relabelled to ``CONTROL``;
- ``obs['context']``: the cell type / cell line / donor the cell comes from;
- ``obs['batch']``: the batch (or the context when the dataset names none);
- ``X``: raw integer UMI counts, CSR, int32;
- ``uns['lingshu']``: what the dataset entry said (name, original control label, type).
"""

CONTROL = "control"
PERT_COL = "perturbation"
CONTEXT_COL = "context"
BATCH_COL = "batch"

# Cell-level split table columns (results/<dataset>/split/cells.tsv)
SPLIT_TRAIN = "in_train"  # the cell may be used to fit models
SPLIT_TEST = "in_test"  # the cell is held-out truth for a test condition
SPLIT_CONTROL_INPUT = "in_control_input"  # control cell handed to models at prediction time
SPLIT_REFERENCE = "in_reference"  # kept out of all training: the generation-fidelity reference
# How splits are drawn; raised whenever the same config and seed would draw another split, so
# that the split rule's params change and Snakemake re-makes an older results folder's split
# and everything after it. 2: the reference is drawn from every cell that would otherwise
# train, control inputs that train included (1: from training conditions' other cells).
SPLIT_VERSION = 2

# Expression space of predictions and of the truth used for evaluation.
TARGET_SUM = 1e4  # log1p(counts / library * 1e4), the CP10k convention of SPEC 5
# uns['lingshu'] key of a prediction: JSON list of the conditions (context, perturbation,
# reason) its model could not encode; they have no predicted cells and are not scored for it.
NOT_ENCODED = "not_encoded"
