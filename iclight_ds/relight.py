"""Kept for `python -m iclight_ds.relight`: the command lives in iclight_ds.infer.relight."""

import sys

from .infer.relight import main

if __name__ == "__main__":
    sys.exit(main())
