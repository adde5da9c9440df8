"""LoRA distillation on its own: phantom paths from one real state, the best one distilled into
a rank-4 adapter by gradient descent, signed, and handed to an in-process device, whose own
auditor judges it before the merge."""

import tempfile
from pathlib import Path

import numpy as np

from plasma import LoRADistiller, NominalModel, PhantomPathSimulator
from plasma.edge.device import DeviceConfig, EdgeDevice
from plasma.protocol import SigningKey, TrustStore
from plasma.protocol.bundle import load_bundle
from plasma.server.catalog import find_model
from plasma.server.run import policy_from_bundle
from plasma.server.tasks import get_task

task = get_task("Pendulum-v1")
bundle = load_bundle(find_model("Pendulum-v1", {}))
policy = policy_from_bundle(bundle)
key = SigningKey.generate()

sim = PhantomPathSimulator(NominalModel(task), task, policy, horizon=30, num_simulations=64)
result = sim.pre_emptive_rollout(np.array([-1.0, 0.0, 0.0], np.float32))  # hanging down
best = sim.get_best_phantom_path(result)
print(f"policy path {result.policy_return:.1f}, best of {len(result.paths)} "
      f"{best.predicted_return:.1f}, success probability {result.success_probability:.2f}")

distiller = LoRADistiller(policy, key, bundle.base_sha256, fleet="lab", device="arm-1", rank=4)
packet = distiller.distill_from_simulation(result)
print(f"packet v{packet.version}: {packet.size} bytes, layers {packet.target_layers}")

with tempfile.TemporaryDirectory() as state:
    device = EdgeDevice(bundle, TrustStore([key.public_key]), Path(state),
                        DeviceConfig(fleet="lab", device="arm-1"))
    record = distiller.inject_to_edge_agent(packet, device)
    print(f"device audit: {record.verdict} {[r.code for r in record.reasons]}, "
          f"active versions {device.versions}")
    stranger = LoRADistiller(policy, SigningKey.generate(), bundle.base_sha256, fleet="lab",
                             device="arm-1")
    record = stranger.inject_to_edge_agent(stranger.sign(None, version=9), device)
    print(f"packet from an untrusted key: {record.verdict} {[r.code for r in record.reasons]}")
