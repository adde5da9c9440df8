"""A policy of your own: any Plasma bundle (here the shipped policy trained for g=14, run on a
Pendulum at g=15 and a heavier mass). ``state_dim`` is checked against the environment."""

import asyncio

from plasma import AgentError, PlasmaAgent

BUNDLE = "pendulum-g14"  # a shipped bundle's name (`plasma-server models list`), or any bundle directory


async def main() -> None:
    try:
        PlasmaAgent(env="Pendulum-v1", policy=BUNDLE, state_dim=4)
    except AgentError as exc:               # a clear, typed error, not a traceback
        print(f"refused as expected: [{exc.code}] {exc}")
    agent = PlasmaAgent(env="Pendulum-v1:g=15,m=1.2", policy=BUNDLE, state_dim=3)
    agent.initialize_state()
    print(f"custom policy, noise-free return: {await agent.evaluate(episodes=5):.1f}")
    for _ in range(50):
        trace = await agent.act()
    print(f"50 real steps, last reward {trace.reward:.3f}, active versions "
          f"{agent.device.versions}")
    agent.close()


asyncio.run(main())
