"""nbdfleece-backup: full and incremental pull-mode backups of an NBD export into a qcow2 chain.

The agent drives a server over QMP (QEMU's command names, so nbdfleece and
qemu-storage-daemon alike), reads a point-in-time snapshot over NBD with
nbdfleece's own client, and keeps the backups as a chain of qcow2 images plus
a JSON manifest in one folder.  ``cli.py`` is the command line.
"""

import os

# The agent does no linear algebra: without this, numpy's OpenBLAS starts one thread per
# core at import, and they spin for a while (about 0.1 s of CPU taken from the server
# and the copy on a 2-core machine).  Before any numpy import; a user's setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
