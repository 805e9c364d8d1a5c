"""assocmem: a lab for associative memory in transformers."""
__version__ = "0.1.0"
