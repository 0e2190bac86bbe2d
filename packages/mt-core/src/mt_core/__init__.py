"""Run configuration, model set-up, loss, optimizer and the train loop.

Not implemented yet: the package skeleton fixes the workspace layout."""
