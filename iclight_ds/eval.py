"""Kept for `python -m iclight_ds.eval`: the command lives in iclight_ds.infer.eval."""

import sys

from .infer.eval import main

if __name__ == "__main__":
    sys.exit(main())
