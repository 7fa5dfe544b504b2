"""What lasts on disk: the HDF5 feature cache, locks, run records, saved models."""
