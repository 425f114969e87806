"""The ways in from outside: the Python API for your own data, the Trainer callback, the pytest plugin
(docs/architecture.md)."""
