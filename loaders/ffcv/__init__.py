"""FFCV: the .beton export of a pack and the `ffcv` loader kind over it (optional extra)."""
