"""Small helpers shared by entry points."""
