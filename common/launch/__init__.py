"""Starting and watching jobs: neither the server nor the worker imports this package.

``local`` (ps-local), ``ssh`` (ps-launch) with ``hostfile`` and ``guard``, ``role``
(ps-role) with ``launcher_env`` (the rank from Slurm/MPI), ``preflight`` with ``probe``
(ps-preflight), ``status`` (ps-status).
"""
