"""``python -m augkd ...`` runs the command-line interface."""
from augkd.cli import main

raise SystemExit(main())
