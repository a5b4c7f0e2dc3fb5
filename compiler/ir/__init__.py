"""The Graph IR: capture with ``torch.export``, coupled-channel analysis, blocks, cost, surgery.

- ``capture``: ``analyze(model, inputs)`` exports the model and runs the analyses below;
- ``types``: the IR's data types (``GraphIR``, ``CoupledGroup``, ``Block``, ``Analysis``);
- ``coupling`` with ``coupling_rules`` and ``coupling_layout_rules``: the channel-slot analysis;
- ``blocks``, ``cost``: removable blocks and the MACs / parameters / memory model;
- ``surgery``, ``cow``, ``verify``: physical pruning, copy-on-write students, the IR verifier;
- ``layerwise``: one transformer block at a time (refits, FSDP sharding).
"""
