"""`python -m gateway` is the `dorm` command."""

from gateway.cli import main

raise SystemExit(main())
