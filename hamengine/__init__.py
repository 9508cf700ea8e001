"""hamengine: fast-data-loading training engine for HAM10000 skin-lesion classification."""

__version__ = "0.1.0"
