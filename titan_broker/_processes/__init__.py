"""Internal: local worker processes. Starting one and waiting for it (``launcher``), the rules of a pool
(``policies``: restart, recycle, autoscale), keeping a pool's processes alive (``supervisor``), the
``Pool``, lifecycle ``events`` and the ``ProcessManager`` on top (``manager``)."""
