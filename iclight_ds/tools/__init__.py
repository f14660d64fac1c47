"""One-off scripts that make the project's shipped assets (the tiny VAE)."""
