"""app stage (see docs/run-directory.md for the files it reads and writes)."""
