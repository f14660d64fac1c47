"""pyproject.toml ships every sub-package and every data file the code reads (checked on the source tree; no build)."""

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _setuptools() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def _source_dir(package: str, st: dict) -> Path:
    return REPO / st.get("package-dir", {}).get(package, package.replace(".", "/"))


def test_every_sub_package_is_listed():
    st = _setuptools()
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "iclight_ds").rglob("__init__.py")
             if "__pycache__" not in p.parts}
    assert set(st["packages"]) == found | {"iclight_ds.ds_configs"}


def test_package_data_covers_the_shipped_files():
    st = _setuptools()
    covered = {f for pkg, globs in st["package-data"].items() for glob in globs
               for f in _source_dir(pkg, st).glob(glob)}
    wanted = [*(REPO / "ds_configs").glob("*.json"), *(REPO / "iclight_ds/model/sd15_configs").rglob("*.json"),
              *(REPO / "iclight_ds/model/assets").glob("*.safetensors"),
              *(REPO / "iclight_ds/train/presets").glob("*.yaml")]
    assert wanted and all(f in covered for f in wanted), sorted(set(wanted) - covered)
