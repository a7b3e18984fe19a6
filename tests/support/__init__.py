"""Helpers the test tiers share (importable as ``support``: tests/ is on sys.path through its
conftest.py): tiny grid files (``grids``), free ports (``ports``), and processes started in a
group of their own and waited for (``processes``)."""
