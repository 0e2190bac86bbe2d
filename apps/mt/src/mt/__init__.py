"""The `mt` command-line app. Not implemented yet: the skeleton fixes the workspace layout."""
