from slonn.scheduler.compiled import install as _install_compiled

_install_compiled()  # compiled extensions or sources, before any module of the package loads
