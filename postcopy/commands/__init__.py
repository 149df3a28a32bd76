"""The ``postcopy dest``, ``postcopy source`` and ``postcopy demo`` commands."""
