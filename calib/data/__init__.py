"""calib/data."""
