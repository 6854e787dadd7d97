"""Data: read every supported format, check it, encode it with the model's chat template."""
