"""Generating the synthetic data set: covariate plans and the sharded, resumable ``sample`` stage."""
