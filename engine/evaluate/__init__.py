"""Scoring a model: inference over a split, metrics, calibration, evaluation plots, run comparison."""
