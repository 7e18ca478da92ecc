"""``python -m mmbridge.docs``: write (or ``--check``) the generated reference pages."""

from mmbridge.docs.generate import main

raise SystemExit(main())
