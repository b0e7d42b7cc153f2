"""ssl-bench: pretrain SSL methods on one backbone, data and budget; probe them with one protocol."""

__version__ = "0.1.0"
