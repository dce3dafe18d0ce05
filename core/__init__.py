"""What every stage shares: one-line user errors and command-line parsing (`core.errors`), progress bars
(`core.progress`), the strict recipe loader (`core.recipe`) and the one Accelerate training loop (`core.trainer`).

Layering: `core` <- `shards` <- `pretrain` <- `finetune`; `core` imports none of them.
"""
