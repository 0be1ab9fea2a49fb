"""The ``titan`` command: inspect services and call their methods."""
