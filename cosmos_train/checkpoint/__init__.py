"""Training state on disk: DCP layout and atomic commit (`layout`), save/resume (`manager`), how a save runs
(`save_modes`), integrity manifests (`integrity`), RNG and data position (`trainer_state`), inspection (`inspect`).

Tensor formats, the weight loader and conversions live in `cosmos_train.export`. Import the submodules
directly (`from cosmos_train.layout import resolve_iteration_dir`); this package import stays
light so the CLI starts fast.
"""
