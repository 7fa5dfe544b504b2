"""Stage 1: bottleneck features of an image set, computed once and cached."""
