"""``lattice demo``: the main job of the quick start.

- :mod:`lattice.demo.elastic` (``lattice demo``): a small model trained by DDP (gloo, CPU) on
  local agents with the embedded rendezvous; one worker is SIGKILLed, a node is added and one
  is stopped; it prints a timeline of the events and writes a plot of the loss.
- :mod:`lattice.demo.simple` (``lattice demo --simple``): one process, SIGKILLed and started
  again; the final weights are bit-identical to an uninterrupted run.
"""
