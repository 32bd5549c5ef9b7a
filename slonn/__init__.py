"""slonn: an inference server that keeps latency promises by changing how much of the network it runs.

The packages live in the checkout's top-level folders and install under this one name: ``slonn.protos``
(protocol, stubs, client), ``slonn.scheduler`` (server, dispatcher, scheduler core, simulator),
``slonn.policy`` (planner, latency model, learner), ``slonn.workers`` (models, kernels, worker processes) and
``slonn.scripts`` (the ``slonn`` command's subcommands).
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("slonn")
except PackageNotFoundError:  # a checkout that is not installed
    __version__ = "0+unknown"
