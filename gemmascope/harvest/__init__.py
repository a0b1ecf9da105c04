"""Harvest: text -> packed token sequences -> one forward pass with hooks -> activation store."""
