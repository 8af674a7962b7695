"""Accuracy and speed benchmarks of the sequential encoder against a same-run SASRec peer."""
