"""The generated reference pages (``python -m mmbridge.docs``)."""
