"""Audio: file I/O (``io``), dataset readers (``datasets``), features (``features``),
augmentations (``augment``) and the synthetic machine-sound generator (``synth``).

Nothing is imported here on purpose: ``import stream_asd.audio.io`` must not pull in torch.
"""
