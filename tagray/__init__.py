"""tagray: Tag-LLM on Ray."""

__version__ = "0.1.0"
