"""mmbridge's contract kit: check a component the way the built-ins are checked.

Plugin authors call the ``check_*`` functions from their own tests (see the README's
"Writing a plugin")."""

from __future__ import annotations

from mmbridge.testing.contracts import check_connector, check_encoder

__all__ = ["check_connector", "check_encoder"]
