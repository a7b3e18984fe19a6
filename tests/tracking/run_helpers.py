"""Shared by the tracking tests: the tags of a trial run."""

from tracking import schema

#: The tags of a brats18/CE base trial, fold 0.
BASE_TRIAL_TAGS = {schema.STAGE: "base", schema.DATASET: "brats18", schema.WEIGHTS: "CE",
                   schema.METHOD: "base", schema.FOLD: "0", schema.LR: "", schema.PROTOCOL: "honest"}
