"""QEMU Machine Protocol control channel.

* ``schema.py``: QAPI-style argument schemas and QEMU's validation errors (pure)
* ``protocol.py``: the sans-I/O session: JSON stream decoder, greeting,
  negotiation, replies and events (pure)
* ``events.py``: the daemon's event broadcaster (pure)
* ``commands.py``: the command table and handlers, acting through the daemon
* ``server.py``: the trio edge, ``serve_qmp``

Nothing is imported here, so ``nbdfleece.daemon`` can use ``qmp.events``
without importing the trio edge.
"""
