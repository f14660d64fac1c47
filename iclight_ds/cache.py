"""Kept for `python -m iclight_ds.cache`: the command lives in iclight_ds.data.cache."""

import sys

from .data.cache import main

if __name__ == "__main__":
    sys.exit(main())
