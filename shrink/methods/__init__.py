"""Compression methods, one module each; shrink.methods.catalog discovers them (see base.py)."""
