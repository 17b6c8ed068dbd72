"""Data-free few-shot replay (NIFF-style): data watchers (class-wise RoI statistics of the
frozen base detector), a generator of base RoI features fitted to them, and few-shot fine-tuning that
replays forged base features with distillation instead of keeping base images. See docs/replay.md.

Modules: :mod:`~ovd.replay.watchers` (``ovd replay stats``), :mod:`~ovd.replay.generator`
(``ovd replay fit``), :mod:`~ovd.replay.fewshot` (``ovd fewshot``).
"""
