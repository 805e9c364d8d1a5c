"""Runners of assocmem."""
