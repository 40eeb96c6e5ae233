"""Models: loading (hub id, local dir, offline zoo), KV geometry per family, rotary maths and KV capture."""
