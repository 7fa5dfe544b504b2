"""Scores, calibration, intervals and paired tests of predictions."""
