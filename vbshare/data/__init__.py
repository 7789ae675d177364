"""Datasets: BBC News (embedded default) and the loaders the training app builds on."""
