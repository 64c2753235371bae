"""QEMU Machine Protocol control channel."""
