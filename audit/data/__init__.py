"""Data and ground truth: canaries and works (what is planted), the corpus, injection, pre-flight checks,
the recipe checks and the models' sources (docs/architecture.md)."""
