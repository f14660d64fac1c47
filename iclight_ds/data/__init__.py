"""Data layer: the on-disk relighting dataset format, images and environment maps, the complementary light split,
aspect-ratio buckets, the synthetic generator, datasets from photos (degradation, prepare), the validator and the
latent cache (docs/data.md)."""
