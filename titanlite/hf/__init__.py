"""Hugging Face export: a trained checkpoint as a folder transformers loads without titanlite.

Nothing here imports transformers: the folder is plain files (config.json, model.safetensors, tokenizer.json, ...),
and the GPT family's modeling code is copied in as text (titanlite/models/gpt/hf_remote).
"""
