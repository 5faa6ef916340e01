"""``python -m bids_app`` is the same as the ``conus`` command."""

from bids_app.cli import main

raise SystemExit(main())
