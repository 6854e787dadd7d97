"""Foreign layouts in, one complete model out: merge scattered parts, convert, export."""
