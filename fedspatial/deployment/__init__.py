"""Deployment: thin wrappers over Flower's SuperLink and ``flower-supernode``.

``fedspatial server``  the coordinating center's SuperLink (TLS, SuperNode authentication,
                       a database so that it can restart)
``fedspatial client``  a hospital's SuperNode (outbound connection only)
``fedspatial keygen``  a hospital's authentication key pair
``fedspatial submit``  submit an experiment config as a Flower run and stream its log

Each wrapper checks what Flower would otherwise report late or cryptically (certificates,
keys, the site's data, whether the SuperLink can be reached and speaks TLS with the given
CA) and stops with a message that says what happened and what to do. Then it runs the
Flower command as a child process, forwards SIGINT/SIGTERM to it and translates Flower's
exit codes into the same kind of message.

Modules, by concern:

- :mod:`.errors`        :class:`~.errors.DeployError` and what Flower's exit codes mean
- :mod:`.network`       addresses, local ports, the SuperLink reachability and TLS check
- :mod:`.certificates`  certificates and the SuperNode authentication keys
- :mod:`.processes`     running Flower commands as child processes
- :mod:`.nodes`         ``fedspatial server`` / ``client``: checks, command lines, running
- :mod:`.superlink`     the center's SuperLink process: Flower's app behind one listener per
                        API (Fleet public; Control and ServerAppIo on 127.0.0.1 by default)
- :mod:`.submit`        ``fedspatial submit`` / ``results``: the run and its report

The command line itself (argparse) is :mod:`fedspatial.cli`; the result line the
ServerApp writes is :mod:`fedspatial.shared.protocol.result_line`.
"""
