"""Shared test setup: offline, quiet, small thread count; the tier markers; the fixtures every tier uses.

Tiers, by folder: tests/unit (fast, in-process, no DeepSpeed ranks), tests/integration (several modules together,
the Trainer in-process on one rank, exports, base loading), tests/e2e (real DeepSpeed ranks through the launcher or
subprocesses, signals, launch/train.sh). Every test gets exactly its folder's marker: `-m "not e2e"` is the fast set.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import helpers  # noqa: E402

torch.set_num_threads(2)

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config, items):
    """The tier marker from the folder (a test outside the three folders, or marked with another tier by hand, is
    an error); `gpu` tests skip, with the reason shown by -rs, where torch sees no CUDA device. The tiers run in
    order: unit, integration, e2e."""
    cuda = torch.cuda.is_available()
    for item in items:
        tier = _tier(item)
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: every test lives in tests/unit, tests/integration or tests/e2e")
        other = {m.name for m in item.iter_markers() if m.name in TIERS} - {tier}
        if other:
            raise pytest.UsageError(f"{item.nodeid}: marked {sorted(other)} but lives in tests/{tier}")
        item.add_marker(getattr(pytest.mark, tier))
        if not cuda and item.get_closest_marker("gpu") is not None:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)"))
    items.sort(key=lambda item: TIERS.index(_tier(item)))  # the fast tiers first; file order within a tier


def _tier(item) -> str | None:
    rel = Path(str(item.fspath)).resolve().relative_to(TESTS)
    return rel.parts[0] if len(rel.parts) > 1 else None


@pytest.fixture(scope="session", autouse=True)
def _process_group_teardown():
    """In-process Trainers join one process group for the whole session; destroy it once, at the end."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture
def free_port() -> int:
    """A free TCP port on 127.0.0.1 for one launcher's rendezvous (--master-port)."""
    return helpers.find_free_port()


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """synthetic(n, size=64, seed=0, extras=True) -> a folder of generated scenes (iclight_ds.data.synth.generate),
    written once per session for each distinct set of arguments. Shared: copy it before changing anything in it."""
    from iclight_ds.data.synth import generate

    made: dict[tuple, Path] = {}

    def make(n: int, *, size: int = 64, seed: int = 0, extras: bool = True) -> Path:
        key = (n, size, seed, extras)
        if key not in made:
            root = tmp_path_factory.mktemp(f"synth-{n}x{size}-seed{seed}{'' if extras else '-lean'}")
            made[key] = Path(generate(root, n, size=size, seed=seed, extras=extras))
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_parts():
    """(UNet, VAE, text encoder, tokenizer) of the tiny size, seed 0. Shared: deep-copy a module before changing it."""
    return helpers.tiny_parts(seed=0)


@pytest.fixture(scope="session")
def tiny_base(tiny_parts, tmp_path_factory) -> Path:
    """`tiny_parts` saved as a diffusers folder, the layout a user's local SD1.5 has (random weights). Read-only."""
    return helpers.write_base_folder(tmp_path_factory.mktemp("tiny_base"), tiny_parts)
