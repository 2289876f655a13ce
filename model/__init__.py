"""The recommender network and the meta learner: pure tensor code, no I/O.

Filled by the meta-learner work; the foundation only needs the package to exist so that
`meta_training` and `service` can depend on it one way.
"""
