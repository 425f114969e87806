"""Releases: what a team ships from a run's tuned weights (the merged model, GGUF files), measured like the tuned model.

The derivative chain the report draws, pretrained -> tuned weights -> outputs, gets the link teams actually ship:
tuned weights -> released weights. :mod:`audit.pipeline.release.gguf_file` writes and reads llama-architecture GGUF files with
the ``gguf`` package; :mod:`audit.pipeline.release.stage` makes the releases of a run and scores each one with the scoring code
the tuned model goes through.
"""
