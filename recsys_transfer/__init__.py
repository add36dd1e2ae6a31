"""recsys-transfer."""
