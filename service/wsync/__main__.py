"""`python -m wsync ...` == the `wsync` command."""

from wsync.cli import main

raise SystemExit(main())
