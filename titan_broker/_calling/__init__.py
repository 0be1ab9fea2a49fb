"""Internal: the calling side. The ``Client`` and its typed proxies (``client``, ``proxy``), requests out
(``sending``), replies back (``replies``), one ``Link`` of both per service called (``links``), streams
(``streaming``), affinity routes (``routing``), the circuit breaker (``breaker``) and jobs (``jobs``)."""
