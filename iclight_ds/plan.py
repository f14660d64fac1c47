"""Kept for `python -m iclight_ds.plan`: the command lives in iclight_ds.train.plan."""

import sys

from .train.plan import main

if __name__ == "__main__":
    sys.exit(main())
