"""lenstrain."""
