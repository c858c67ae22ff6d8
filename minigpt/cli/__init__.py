"""Command-line front doors. Each module parses arguments and calls into the library."""
