"""``python -m featstore`` runs the command line."""

from featstore.cli import main

raise SystemExit(main())
