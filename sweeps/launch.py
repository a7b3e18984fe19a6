"""Entry point: ``python sweeps/launch.py --grid {demo,paper,PATH.yaml} [...]`` (see --help)."""

import os
import sys

# Run as a script, Python puts sweeps/ itself first on sys.path, which would make its modules
# importable under bare names (``config``, ``plan``) -- and Ray would hand that path to every
# worker. The package is installed (pip install -e .), so drop it.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

from sweeps.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
