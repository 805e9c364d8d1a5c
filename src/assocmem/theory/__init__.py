"""Theory of assocmem."""
