"""Evaluation: CORE (titanlite.eval.core) and the other held-out metrics."""
