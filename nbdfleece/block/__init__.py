"""The block layer: nodes, stores and layers (see ``node.py``)."""

from nbdfleece.block.file import FileStore
from nbdfleece.block.node import BlockNode, Extent, Layer, Segment

__all__ = ["BlockNode", "Extent", "FileStore", "Layer", "Segment"]
