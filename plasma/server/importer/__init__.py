"""``plasma-server import-policy``: an ONNX MLP policy from PyTorch or Stable-Baselines3 -> a Plasma bundle.

Three stages, one module each: ``graph`` reads the file into a chain of steps (refusing the first
unsupported node by name and op), ``layers`` folds the chain into Plasma's policy convention
(normalization, layers, one hidden activation, a tanh squash or a clip), ``write`` writes the
bundle with Plasma's own exporter and checks it against the original file in onnxruntime.
"""

from __future__ import annotations

from .graph import Chain, Step, read_chain
from .layers import PolicySpec, policy_spec
from .write import FP32_TOLERANCE, env_spaces, import_policy

__all__ = ["Chain", "FP32_TOLERANCE", "PolicySpec", "Step", "env_spaces", "import_policy", "policy_spec",
           "read_chain"]
