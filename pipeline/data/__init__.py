"""Image sets: folder, split-folder and CSV layouts, splits, robust image loading."""
