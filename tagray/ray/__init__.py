"""Thin Ray adapters over the pure-torch core: shared base weights, Train, Tune, Serve."""
