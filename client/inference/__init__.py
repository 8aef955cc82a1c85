"""The hospital's encrypted-inference service (``xrayfed serve-inference``) and its tokens
(``xrayfed token``), one job per module:

* :mod:`~.gate`: the access gate: audit log, revoked tokens, admission limits;
* :mod:`~.service`: the gRPC service that opens MPC sessions for patients;
* :mod:`~.cli`: starting the service from its config, and the command handlers.

Nothing is imported here, so importing one module does not load the others' dependencies.
"""
