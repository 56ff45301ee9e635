"""Per-concept training data: images, masks, cached latents and text states (prepare)."""
