"""Multi-step evolution: how much of the gap to a policy trained for the new physics the agent
closes from its own real steps, measured noise-free before and after."""

import asyncio

from plasma import PlasmaAgent


async def main() -> None:
    agent = PlasmaAgent(env="Pendulum-v1:g=14", steps_per_round=200, seed=1)
    agent.initialize_state()
    before = await agent.evaluate(episodes=10)
    print(f"noise-free return before: {before:.1f}")
    for round_no in range(3):
        await agent.evolve(steps=1)                     # 200 real steps, then one learning round
        result = agent.records[-1]
        now = await agent.evaluate(episodes=10)
        print(f"round {round_no + 1}: {len(agent.traces)} real steps, last record "
              f"{result.auditor}:{result.verdict}, noise-free return {now:.1f}")
    agent.close()


asyncio.run(main())
