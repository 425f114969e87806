"""pytest plugin (entry point ``pytest11``): gate audit reports in a test suite. Imports nothing heavy."""

from __future__ import annotations
