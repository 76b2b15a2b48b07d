"""The ``dsreg`` command: parses options, calls :mod:`registry`, prints. No logic of its own."""
