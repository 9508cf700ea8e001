"""Ingest: reading a HAM10000 download (layouts, metadata, splits) and synthesizing HAM10000-shaped data."""
