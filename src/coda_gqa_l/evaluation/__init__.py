"""Evaluation: perplexity read as a stream through a model's cache."""

from .perplexity import stream_nll, stream_perplexity

__all__ = ["stream_nll", "stream_perplexity"]
