"""xrayfed shared code: config, data, preprocessing, model, metrics, CLI."""
