"""The model layer: the SD1.5 architecture, IC-Light surgery and modules, frozen encoders and the shipped tiny VAE
assets, base loading, key formats and the noise schedule. Knows nothing of DeepSpeed, datasets or the loop."""
