"""A Llama-3-style decoder: the model (model.py); its TrainSpec wiring lives in spec.py."""
