"""``python -m pipeline.bench``: what ``make bench`` runs."""

from pipeline.bench.suite import main

main()
