"""wsync: the weight-sync control plane."""

__version__ = "0.1.0"
