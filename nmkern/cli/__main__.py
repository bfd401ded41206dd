"""``python -m nmkern.cli``: the ``nmkern`` command."""

from . import main

raise SystemExit(main())
