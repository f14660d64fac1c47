"""An exponential moving average of the trainable weights (train.ema_decay), with diffusers' EMAModel.

Rank 0 keeps it, in fp32: on the training device, or on the host when the DeepSpeed config offloads (the GPU then
has no room for a second copy). ZeRO-3 is refused before this is built (train/resolve.check_run): its ranks never
hold whole weights. Saved in every checkpoint as EMA_FILE; the export takes it by default.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from safetensors import safe_open

from ..model.formats import save_safetensors

EMA_FILE = "ema.safetensors"
FORMAT = "iclight-ds ema v1"


class WeightsEMA:
    def __init__(self, module: torch.nn.Module, decay: float, *, device: torch.device):
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.device = device
        self.ema = EMAModel(self._params(module), decay=decay)  # clones them: the first average is the weights

    def _params(self, module: torch.nn.Module) -> list[torch.Tensor]:
        """The trainable parameters as the EMA reads them: in fp32 on its device. EMAModel averages only tensors that
        require grad (it copies the others), so host copies are marked so."""
        named = dict(module.named_parameters())
        params = [named[n] for n in self.names]
        if all(p.device == self.device and p.dtype == torch.float32 for p in params):
            return params
        return [p.detach().to(self.device, torch.float32).requires_grad_(True) for p in params]

    def update(self, module: torch.nn.Module) -> None:
        """After each optimizer step."""
        self.ema.step(self._params(module))

    @property
    def steps(self) -> int:
        return self.ema.optimization_step

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{parameter name: averaged fp32 tensor}, named as in the module's state_dict."""
        return dict(zip(self.names, self.ema.shadow_params))

    @contextlib.contextmanager
    def swapped_in(self, module: torch.nn.Module):
        """The module runs on the averaged weights inside the block (previews, evaluation); its own come back after."""
        named = dict(module.named_parameters())
        params = [named[n] for n in self.names]
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield module
        finally:
            self.ema.restore(params)

    def save(self, path: Path) -> Path:
        meta = {"format": FORMAT, "optimization_step": str(self.ema.optimization_step), "decay": str(self.ema.decay)}
        state = {k: v.cpu() for k, v in self.state_dict().items()}
        return save_safetensors(state, path, dtype=torch.float32, metadata=meta)

    def load(self, path: Path) -> None:
        """Restore a saved EMA exactly (its tensors and its step count, which sets the next decay)."""
        state, meta = read_ema_file(path)
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise ValueError(f"{path}: no EMA for {len(missing)} trainable parameter(s), e.g. {missing[:3]}")
        self.ema.shadow_params = [state[n].to(self.device) for n in self.names]
        self.ema.optimization_step = int(meta["optimization_step"])


def read_ema_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state, metadata) of an EMA_FILE; one without our format tag is refused by name."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not an iclight-ds EMA file (no '{FORMAT}' metadata)")
        return {k: f.get_tensor(k) for k in f.keys()}, meta
