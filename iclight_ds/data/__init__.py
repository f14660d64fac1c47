"""Data layer: on-disk relighting datasets, the synthetic generator, and the validator.

Format and commands: README section "Datasets".
"""

from iclight_ds.data.dataset import DatasetError, Problem, RelightDataset, Sample, read_manifest
from iclight_ds.data.imageio import linear_to_srgb, srgb_to_linear
from iclight_ds.data.tokenizer import build_char_tokenizer

__all__ = [
    "DatasetError", "Problem", "RelightDataset", "Sample", "build_char_tokenizer", "generate",
    "linear_to_srgb", "read_manifest", "srgb_to_linear", "validate_dataset",
]


def __getattr__(name: str):
    # Imported lazily so that `python -m iclight_ds.data.synth` / `.validate` do not find their own
    # module already imported by this package (runpy warns about that).
    if name == "generate":
        from iclight_ds.data.synth import generate
        return generate
    if name == "validate_dataset":
        from iclight_ds.data.validate import validate_dataset
        return validate_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
