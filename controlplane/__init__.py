"""controlplane: serve AI models on GPU clusters with priority flow control (see README.md)."""

__version__ = "0.1.0"
