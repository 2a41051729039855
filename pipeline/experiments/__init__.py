"""Experiments built on the trainer: method × noise × bits × seed grids, Ray Tune sweeps, and
cleaned dataset versions from a run's suspect-label report."""
