"""``python -m nbdfleece`` runs the command line."""

from nbdfleece.cli import main

raise SystemExit(main())
