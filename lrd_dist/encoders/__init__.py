"""Item encoders: language models over item texts, and the embedding tables they produce."""
