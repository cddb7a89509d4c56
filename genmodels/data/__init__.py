"""Data room: image sources, WebDataset shards + manifest, and the per-rank shard loader."""
