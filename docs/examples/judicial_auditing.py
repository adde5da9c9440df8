"""Judicial auditing of real traces: a reward spike is caught and corrected to the task's own
reward, a frozen sensor is kept out of learning, honest traces pass."""

import asyncio

from plasma import JudicialAuditor, PlasmaAgent


async def main() -> None:
    agent = PlasmaAgent(env="Pendulum-v1:m=1.3")
    agent.initialize_state()
    auditor = JudicialAuditor(agent.task)
    honest = [await agent.act() for _ in range(100)]
    verdicts = [auditor.audit_state_trace(t).verdict for t in honest]
    print(f"honest traces: {verdicts.count('accepted')} of {len(verdicts)} accepted")

    spiked = honest[3].model_copy(update={"reward": 50.0})       # a reward no state can earn
    record = auditor.audit_state_trace(spiked)
    print(f"spiked reward: {record.verdict} {[r.code for r in record.reasons]}")
    fixed = auditor.apply_correction(record, spiked)
    print(f"corrected reward: {fixed.reward:.3f} (recorded {spiked.reward}, "
          f"true {honest[3].reward:.3f})")

    frozen = honest[-1]
    for _ in range(25):                                          # a sensor stuck on one value
        record = auditor.audit_state_trace(frozen)
    print(f"frozen sensor: {record.verdict} {[r.code for r in record.reasons]}, "
          f"kept for learning: {auditor.apply_correction(record, frozen) is not None}")
    agent.close()


asyncio.run(main())
