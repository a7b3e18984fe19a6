"""calib/methods."""
