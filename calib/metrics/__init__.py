"""calib/metrics."""
