"""Kept for `python -m iclight_ds.base_model`: the command lives in iclight_ds.model.base."""

import sys

from .model.base import main

if __name__ == "__main__":
    sys.exit(main())
