"""Offline job: data, protocol, embedding pretraining, meta-training and evaluation."""
