"""Dataset preparation (prepare.py), the token shard format and the batch loader."""
