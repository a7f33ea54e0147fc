"""Scripts around the engine: the web demo, batch captioning, and the builder of the bundled default models."""
