"""Kept for `python -m iclight_ds.tiny_vae`: the command lives in iclight_ds.tools.tiny_vae."""

import sys

from .tools.tiny_vae import main

if __name__ == "__main__":
    sys.exit(main())
