"""What ``make bench`` measures (``python -m pipeline.bench``)."""
