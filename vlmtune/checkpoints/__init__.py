"""Complete model folders: save, load, describe."""
