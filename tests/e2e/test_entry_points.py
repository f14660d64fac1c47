"""The documented command lines still start: `python -m iclight_ds.train` and the thin top-level modules kept for
`python -m iclight_ds.{export,relight,eval,plan,cache,tiny_vae,base_model}` answer --help."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO, subprocess_env

MODULES = ("iclight_ds.train", "iclight_ds.export", "iclight_ds.relight", "iclight_ds.eval", "iclight_ds.plan",
           "iclight_ds.cache", "iclight_ds.tiny_vae", "iclight_ds.base_model")

# each module run as `python -m` runs it (runpy, as __main__), in one interpreter: the imports are paid once
SCRIPT = r"""
import contextlib, io, json, runpy, sys
results = {}
for module in sys.argv[1:]:
    out, code = io.StringIO(), None
    sys.argv = [module, "--help"]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
    except Exception as e:  # an import error names the module that is missing
        code = f"{type(e).__name__}: {e}"
    results[module] = {"code": code, "help": out.getvalue()}
print(json.dumps(results))
"""


def test_every_documented_module_answers_help():
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *MODULES], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = {m: r["code"] for m, r in results.items() if r["code"] not in (0, None)}
    assert not failed, failed
    quiet = [m for m, r in results.items() if not r["help"].strip()]
    assert not quiet, f"printed no help: {quiet}"
