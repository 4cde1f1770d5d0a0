"""The embedded development stack: a loopback S3 server, an MLflow server on sqlite and a local Ray head (``stack``),
extra Ray nodes, and the fault-injection proxy the tests put in front of S3 and MLflow (``proxy``).

A development tool, not part of the product: ``reid_core`` never imports it, registered models never carry it, and its
dependencies (moto's server, aiohttp) come from the ``devstack`` extra that ``make setup`` installs.
"""
