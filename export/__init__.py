"""Train time: datasets, models, objectives, training and export to a model repository (needs torch)."""
