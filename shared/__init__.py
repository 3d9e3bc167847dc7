"""Code both sides of a federation use; no Flower imports (a test checks it).

Sub-packages by concern: ``data`` (reading, validating and generating sections),
``features`` (federated feature space), ``graph`` (spatial neighbourhoods), ``models``,
``training``, ``privacy``, ``algorithms`` (the numpy math of each federated algorithm),
``evaluation`` (metrics), ``protocol`` (message vocabulary and payloads), ``phases``
(one module per federated algorithm: server half and site half), ``storage`` (atomic
writes, checkpoints), plus ``config`` and ``plots``.
"""
