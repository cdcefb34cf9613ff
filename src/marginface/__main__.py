"""`python -m marginface` runs the command-line interface."""

from marginface.cli import main

raise SystemExit(main())
