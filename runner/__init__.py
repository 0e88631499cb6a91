"""runner: push large manifests of FLUX image requests through fal.ai's queue, resumably."""

__version__ = "0.1.0"
