"""Built-in optimizers (optax gradient transformations) and learning-rate schedules."""
