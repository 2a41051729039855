"""Errors raised for bad input to the feature store."""


class FeatureStoreError(ValueError):
    """Bad input or a store that fails verification; the message names file, column or value."""
