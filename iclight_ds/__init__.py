"""iclight-ds: an open DeepSpeed trainer for IC-Light relighting models on the SD1.5 UNet."""

__version__ = "0.1.0"
