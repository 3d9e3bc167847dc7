"""The numpy math of each federated algorithm, tested against its pooled reference."""
