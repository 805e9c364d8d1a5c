"""Analysis of assocmem."""
