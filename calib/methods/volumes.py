"""Moved to :mod:`calib.data.batches` (the batch loaders live with the data); kept for importers."""

from calib.data.batches import VolumeBatches  # noqa: F401
