"""featstore: frozen-backbone features for video segmentation, computed once and stored as versioned zarr artifacts."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("featstore")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
