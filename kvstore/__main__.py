"""`python -m kvstore ...` is the `kvstore` command."""

from kvstore.cli.serve import main

raise SystemExit(main())
