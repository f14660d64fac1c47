"""Data layer: the on-disk relighting dataset format, images, the complementary light split, the synthetic
generator, the validator and the latent cache (docs/data.md)."""
