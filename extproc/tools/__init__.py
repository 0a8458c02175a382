"""Tools around the service, never on its request path: the virtual-time
simulator, the fairness measures it reports, the `extproc top` live view and the
demo model server. They may use anything below `service`, and nothing imports them
but the CLI.
"""
