"""mmbridge's contract kit: check a component the way the built-ins are checked.

Plugin authors call the ``check_*`` functions from their own tests (see the README's
"Writing a plugin")."""
