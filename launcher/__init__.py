"""Running a mesh: the topology (services, flags, ports) that both `splitserve up` and
compose.yaml come from, the process supervisor, certificates and run secrets, and `up` itself.
"""


class LaunchError(Exception):
    """What the user must fix, in one line (the CLI prints it and exits with status 2)."""
