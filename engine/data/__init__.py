"""Data: packing into THD micro-batches, generated data sets, and each rank's slice of a step."""
