"""Models of assocmem."""
