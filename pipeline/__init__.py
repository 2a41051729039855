"""RSHNL: robust self-paced cross-modal hashing with noisy labels."""
