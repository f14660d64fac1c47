"""Inference: sampling relit images, image inputs, loading trained weights, previews, metrics, eval and the
relight command."""
