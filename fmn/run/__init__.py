"""A build: run folders and locks, and the stages (path in, path out) the flows wire."""
