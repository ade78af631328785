"""Routing-path prediction: the learned predictor, the peers' predictors, trace import and evaluation."""
