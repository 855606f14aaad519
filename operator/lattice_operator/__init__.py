"""The Lattice Kubernetes operator: ``kopf run --standalone --all-namespaces -m lattice_operator``.

Importing the package registers the kopf handlers (:mod:`.handlers`); every decision they act
on is made by the pure core in ``lattice.k8s`` (see docs/operator.md).
"""

from . import handlers

__all__ = ["handlers"]
