"""The image side of mmspec: loading and validation, the embedding cache, encoders, visual-token compression, and the synthetic scene world."""
