"""Tensor formats and conversions: one `TensorSource` per format (`tensor_source`, `dcp_source`, `pt_io`,
`safetensors_io`, `diffusers_folder`), one key planner (`keys`), the weight loader every reader shares (`load`),
DCP -> file (`consolidate`), file -> DCP (`convert`), LoRA merge / PEFT adapter export (`lora_export`), the spec
a consolidated file carries (`described`) and the key/config mapping to diffusers (`diffusers`).

Import the submodules directly; this package import stays light so the CLI starts fast.
"""
