"""The pass infrastructure, one concern per module: ``base`` (the ``Pass`` class, its result and the
predicates it declares), ``options`` (options typed from their annotations), ``text`` (pipeline
strings), ``instruments`` (timing, dumps, verification) and ``manager`` (``PassManager``).

The registry and ``build_pipeline`` are ``potstill.pipeline``, which re-exports every name here.
"""
