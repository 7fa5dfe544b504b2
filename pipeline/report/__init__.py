"""Tables, plots, the mistakes gallery and the report that compares every run."""
