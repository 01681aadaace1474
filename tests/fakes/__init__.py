"""In-process doubles for fast tests only (never the product path)."""
