"""titanlite: compute-optimal GPT pretraining from a single `depth` dial."""

__version__ = "0.1.0"
