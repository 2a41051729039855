"""Experiments built on the trainer: method × noise × bits × seed grids, Ray Tune sweeps, cleaned
dataset versions from a run's suspect-label report, and benchmarks of the training path."""
