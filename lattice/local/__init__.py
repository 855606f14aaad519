"""Running a ``TrainingJob`` on one machine: ``lattice local apply|get|scale|logs|delete``.

The operator's pure reconcile core (``lattice.k8s``) decides; here its actions act on local
processes: a "pod" is a ``lattice agent`` process, the rendezvous is an embedded server in the
job's controller process, and the job's state lives in a directory (see :mod:`.state`).
"""
