"""Checkpoints: DCP layout and atomic commit (`layout`), save/resume (`manager`), load sources
(`sources`), integrity manifests (`integrity`), inspection (`inspect`).

Import the submodules directly (`from cosmos_train.checkpoint.layout import resolve_iteration_dir`);
this package import stays light so the CLI starts fast.
"""
