"""Experiments of assocmem."""
