"""Models assembled from the capsnet parts; every model returns a `ModelOutput`."""

from capsnet.models.capsnet import CapsNet
from capsnet.models.baseline import BaselineCNN

__all__ = ["CapsNet", "BaselineCNN"]
