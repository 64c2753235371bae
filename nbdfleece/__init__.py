"""nbdfleece: an NBD server for incremental live backup."""

__version__ = "0.1.0"
