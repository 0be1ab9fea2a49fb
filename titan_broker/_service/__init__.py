"""Internal: what a service is. The decorators a service class uses (``decorators``) and the class read
into a ``ServiceDefinition`` of ``MethodSpec``s (``definition``)."""
