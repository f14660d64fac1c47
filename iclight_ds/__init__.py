"""iclight-ds: an open DeepSpeed trainer for IC-Light relighting models on the SD1.5 UNet."""

# Only the standard library here: this runs before diffusers, bitsandbytes and transformers are first imported.
from .quiet import install as _install_quiet

__version__ = "0.1.0"

_install_quiet()
