"""The transformers side: the VLM, its bases, vision geometry, training, reading an answer."""
