"""The data audit from the feature cache: label issues, near-duplicates and leaks, outliers, a map.

One module per idea:

- ``rows.py``: every readable row of a cache, labelled or not, read in blocks;
- ``labels.py``: out-of-fold probabilities of a fast head, ranked by cleanlab;
- ``neighbours.py``: exact cosine kNN in chunks, exact and near duplicates, leakage;
- ``outliers.py``: images far from their nearest neighbours;
- ``projection.py``: the 2-D map (openTSNE) coloured by label;
- ``gallery.py``: contact sheets of the suspects;
- ``run.py``: the stage, :func:`audit`.
"""
