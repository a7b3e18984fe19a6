"""calib/nets."""
