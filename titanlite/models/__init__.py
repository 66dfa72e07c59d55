"""Registered model families. Each sub-package exposes its TrainSpec pieces; titanlite.spec registers them."""
