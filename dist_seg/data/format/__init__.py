"""What a shard directory is: manifest.json, the shard set and its checks (shards), tar members read from
their headers, the sample reader and writer, and remote storage through fsspec (remote)."""
