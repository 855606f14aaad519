"""Lattice: elastic, fault-tolerant training."""
