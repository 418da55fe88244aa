"""Dataset loaders. Each module knows only files: it turns a folder into training/test items."""
