"""The engine core in its own process (vLLM v1's split): ``messages`` (the wire schema), ``process`` (the core's
loop around one ``Engine``), ``client`` (``CoreClient``: ``AsyncEngine``'s interface over the wire, what
``small4 serve --engine-process separate`` builds). pyzmq and msgpack are imported only by these modules."""
