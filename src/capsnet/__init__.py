"""capsnet: capsule networks with dynamic routing (Sabour, Frosst, Hinton 2017)."""

__version__ = "0.1.0"
