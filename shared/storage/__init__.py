"""Writing outputs safely: atomic files, model checkpoints."""
