"""The training loop and its supporting pieces: metrics sinks, plots, checkpoint directories, pre-emption signals."""
