"""Samples, synthetic benchmark, shards and the Lightning data module."""
