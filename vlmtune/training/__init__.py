"""Training runs on the transformers Trainer."""
