"""Generate, evaluate and chat with a trained model."""
