"""Using a fitted model: predictions on new images."""
