"""Training a concept's patch: attention capture, textual inversion, the re-steering loop."""
