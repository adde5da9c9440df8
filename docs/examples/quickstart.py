"""The README's quick start: think, act, learn and evolve on a Pendulum heavier and under
stronger gravity than the one its policy was trained for."""

import asyncio

from plasma import PlasmaAgent


async def main():
    agent = PlasmaAgent(
        env="Pendulum-v1:m=1.6,g=12",   # a Gymnasium id with physics overrides, or a gymnasium.Env
        simulation_horizon=10,          # phantom-path length
        num_simulations=5,              # phantom paths per think()
        enable_auditing=True,           # judicial auditor on every packet
        enable_distillation=True,       # learn() distils LoRA packets
    )
    agent.initialize_state()
    simulation = await agent.think()          # SimulationResult: phantom paths from the current real state
    print(f"Success probability: {simulation.success_probability:.2f}")
    trace = await agent.act(simulation)       # StateTrace: one real step of the int8 policy
    print(f"Action: {trace.action_taken}, Reward: {trace.reward:.3f}")
    packet = await agent.learn(simulation)    # InstructionPacket: a signed LoRA packet, audited
    print(f"Generated LoRA packet with {len(packet.target_layers)} target layers")
    traces = await agent.evolve(steps=10)     # the closed loop, in process
    print(f"Completed {len(traces)} evolution steps")


asyncio.run(main())
