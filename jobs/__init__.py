"""Jobs that compose featstore and decoders: featurize, train, predict, evaluate, compare; local or on dask."""
