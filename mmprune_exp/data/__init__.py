"""Synthetic, seeded data sources (shape scenes) used to train and evaluate the embedded tiny model."""
