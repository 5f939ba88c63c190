"""optiflow's built-in plugins, one module per technique family.

Installed as the package ``optiflow_plugins`` and registered by the core
(``optiflow.plugins.DEFAULT_PLUGINS``) through the same ``pm.register()`` that
third-party plugins go through.  Modules import torch only inside factories so
that listing components stays fast.
"""
