"""A served teacher (``teacher.backend=server``): the client the trainer scores through, and a small HF server."""
