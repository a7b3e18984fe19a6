"""``python -m calib.apply --model-dir DIR --input PATH ... --out DIR``: the command line of
:mod:`calib.apply.cli`. A trial run or a registered model: ``python -m tracking.apply``."""

import sys

from calib.apply.cli import main

if __name__ == "__main__":
    sys.exit(main())
