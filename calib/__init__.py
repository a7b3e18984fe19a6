"""calib."""
