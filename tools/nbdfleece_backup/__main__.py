import sys

from nbdfleece_backup.cli import main

sys.exit(main())
