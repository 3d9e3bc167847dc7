"""Local training of an encoder on one site's neighbourhood mini-batches."""
