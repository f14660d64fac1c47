"""Kept for `python -m iclight_ds.export`: the command lives in iclight_ds.train.export."""

import sys

from .train.export import main

if __name__ == "__main__":
    sys.exit(main())
