"""Encoder/decoder architectures, registered by name."""
