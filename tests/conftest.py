"""Shared test setup: offline, quiet, small thread count."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def tiny_model_cfg():
    from iclight_ds.config import ModelConfig

    return ModelConfig(size="tiny")


@pytest.fixture(scope="session", autouse=True)
def _process_group_teardown():
    """In-process Trainers join one process group for the whole session; destroy it once, at the end."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
