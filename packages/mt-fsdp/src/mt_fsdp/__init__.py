"""FSDP2 wrapping, mixed precision, sharded loading and distributed checkpoints.

Not implemented yet: the package skeleton fixes the workspace layout."""
