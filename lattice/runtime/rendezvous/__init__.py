"""Elastic rendezvous: membership, rounds and ranks over a KV store (see ``decide`` for the rules)."""
