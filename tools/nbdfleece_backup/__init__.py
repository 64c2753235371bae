"""nbdfleece-backup: full and incremental pull-mode backups of an NBD export into a qcow2 chain.

The agent drives a server over QMP (QEMU's command names, so nbdfleece and
qemu-storage-daemon alike), reads a point-in-time snapshot over NBD with
nbdfleece's own client, and keeps the backups as a chain of qcow2 images plus
a JSON manifest in one folder.  ``cli.py`` is the command line.
"""

__version__ = "0.1.0"
