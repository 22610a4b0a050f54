"""The wire: what travels between processes and how.

``protocol`` (the header and its checks), ``codec`` (the only code that knows a message's
bytes), ``compress`` (gradient compression), ``transport`` (the only ``zmq`` user),
``addresses`` (this host's addresses, why a peer cannot be reached), ``keys`` (CurveZMQ).
"""
