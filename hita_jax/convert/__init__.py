"""Official PyTorch layouts <-> hita_jax parameters: name tables (official names -> ours, in each
module docstring), the safe `.pt` reader (`torch_files`) and import/export functions. Tasks never
import this package; they load through `hita_jax.pretrained`."""
