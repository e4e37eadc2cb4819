"""``python -m deformconv``: the ``deformconv`` command."""

from .cli import main

raise SystemExit(main())
