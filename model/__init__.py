"""The recommender network, the meta learner and the artifact: tensor code that
`meta_training` (which writes artifacts) and `service` (which loads them) both import, and
that imports neither."""
