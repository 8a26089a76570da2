"""metriclab: config-driven metric-learning experiments over OML, Lightning, Hydra and MLflow."""
