"""Token pruning methods: each returns a KeepTokens op (runtime.TokenPruningEncoder ranks tokens at run time)."""
