"""attnserve models: PyTorch definitions, data, tokenizer and training. Used for training and export only."""
