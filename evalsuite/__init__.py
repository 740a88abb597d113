"""evalsuite: accuracy evaluation of quantized LLMs (see README.md)."""

__version__ = "0.1.0"
