"""The built-in demo: a tiny VLM learns synthetic shapes from scratch."""
