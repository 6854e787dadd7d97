"""Which components train and how: frozen, full or LoRA, each with its own learning rate."""
