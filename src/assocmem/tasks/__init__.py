"""Tasks of assocmem."""
