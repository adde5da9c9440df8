"""Replay devices for ``bench scale``: recorded real transitions sent as telemetry at a set rate.

A full device runtime steps a policy and an environment; what the server sees of it is its
telemetry. To put many devices on one machine, a replay process holds several devices, each
with its own MQTT session, and sends frames of transitions recorded from a real Gymnasium run
(``record``), stamped with the wall-clock time they are sent (the bench's data-to-packet clock).

``python -m plasma.server.bench.replay --broker URL --fleet F --devices d0,d1 --data FILE
--rate-hz R --frame-rows N --duration S``
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from pathlib import Path

import numpy as np

from plasma.protocol import TraceBatch, encode_traces, topics
from plasma.protocol.bus import BrokerConfig, MqttBus

from ..policy_net import MLPPolicy
from ..tasks import make_env

__all__ = ["record", "replay"]

log = logging.getLogger(__name__)


def record(env_id: str, physics: dict[str, float], policy: MLPPolicy, steps: int, path: Path,
           noise: float = 0.3, seed: int = 0) -> Path:
    """Run ``policy`` (plus Gaussian action noise) in the Gymnasium env with ``physics``; save
    ``steps`` real transitions (obs, act, rew, next_obs, episode) to ``path`` (.npz)."""
    env = make_env(env_id, physics)
    rng = np.random.default_rng(seed)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("obs", "act", "rew", "next", "episode")}
    episode = 0
    obs, _ = env.reset(seed=seed)
    low, high = env.action_space.low, env.action_space.high
    for _ in range(steps):
        act = policy.forward(np.asarray(obs, np.float32)[None])[0]
        act = np.clip(act + rng.normal(0, noise, act.shape), low, high).astype(np.float32)
        nxt, rew, term, trunc, _ = env.step(act)
        for k, v in (("obs", obs), ("act", act), ("rew", rew), ("next", nxt),
                     ("episode", episode)):
            cols[k].append(np.asarray(v))
        obs = nxt
        if term or trunc:
            episode += 1
            obs, _ = env.reset(seed=seed + episode)
    np.savez(path, **{k: np.stack(v) for k, v in cols.items()})  # type: ignore[arg-type]
    return path


def replay(url: str, fleet: str, devices: list[str], data: Path, rate_hz: float,
           frame_rows: int, duration: float, stop: threading.Event | None = None) -> int:
    """Send each device's frames until ``duration`` is over; returns the frames sent."""
    d = np.load(data)
    n = len(d["obs"])
    stop = stop or threading.Event()
    buses = []
    for dev in devices:
        bus = MqttBus(BrokerConfig.from_url(url), client_id=f"replay-{fleet}-{dev}")
        bus.connect()
        buses.append(bus)
    offsets = [(i * 997) % n for i in range(len(devices))]
    period = frame_rows / rate_hz
    start, sent, k = time.monotonic(), 0, 0
    try:
        while not stop.is_set() and time.monotonic() - start < duration:
            for i, (dev, bus) in enumerate(zip(devices, buses)):
                idx = (offsets[i] + k * frame_rows + np.arange(frame_rows)) % n
                now = time.time()
                batch = TraceBatch(
                    fleet=fleet, device=dev, seq=k, episode=d["episode"][idx].astype(np.uint32),
                    step=idx.astype(np.uint32), obs=d["obs"][idx].astype(np.float32),
                    action=d["act"][idx].astype(np.float32),
                    reward=d["rew"][idx].astype(np.float32),
                    next_obs=d["next"][idx].astype(np.float32),
                    terminated=np.zeros(frame_rows, bool), truncated=np.zeros(frame_rows, bool),
                    versions={"fleet": np.zeros(frame_rows, np.uint32),
                              "device": np.zeros(frame_rows, np.uint32)},
                    timestamp=now - (frame_rows - 1 - np.arange(frame_rows)) / rate_hz)
                bus.publish(topics.telemetry(fleet, dev), encode_traces(batch), qos=1)
                sent += 1
            k += 1
            stop.wait(max(0.0, start + k * period - time.monotonic()))
    finally:
        for bus in buses:
            bus.close()
    return sent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--broker", required=True)
    p.add_argument("--fleet", required=True)
    p.add_argument("--devices", required=True, help="comma-separated device ids")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--rate-hz", type=float, default=50.0)
    p.add_argument("--frame-rows", type=int, default=50)
    p.add_argument("--duration", type=float, default=60.0)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sent = replay(a.broker, a.fleet, a.devices.split(","), a.data, a.rate_hz, a.frame_rows,
                  a.duration, stop)
    log.info("sent %d frames", sent)


if __name__ == "__main__":
    main()
